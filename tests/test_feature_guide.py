"""The guide that reads the frozen UNet's own encoder features: identity at init, the same injection as
diffusers' ControlNet arguments, residual counts on SD1.5/SDXL layouts, budget, save/load."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import guide_inputs, randomised, tiny_unet
from pnpguide.evaluation.speed import SD15, SDXL
from pnpguide.guide import GuideModel, residual_channels, skip_levels
from pnpguide.teacher import guided_noise_pred


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_an_untrained_feature_guide_leaves_the_unet_output_unchanged(unet, size):
    guide = GuideModel.from_unet(unet, size=size, reads="unet_features")
    sample, t, embeds = guide_inputs()
    assert torch.equal(unet(sample, t, embeds).sample, guided_noise_pred(unet, guide, sample, t, embeds, torch.tensor([3.0, 8.0])))


def _recording(guide) -> dict:
    """What the guide is called with and returns, recorded by a forward hook."""
    seen = {}

    def record(module, args, kwargs, output):
        seen.update(features=kwargs["unet_features"], residuals=output)

    guide.register_forward_hook(record, with_kwargs=True)
    return seen


def test_hooks_add_the_residuals_where_diffusers_controlnet_arguments_do(unet):
    guide = randomised(GuideModel.from_unet(unet, reads="unet_features"))
    sample, t, embeds = guide_inputs()
    seen = _recording(guide)
    hooked = guided_noise_pred(unet, guide, sample, t, embeds, 4.0)
    r = seen["residuals"]
    explicit = unet(sample, t, embeds, down_block_additional_residuals=list(r.down_block_additional_residuals),
                    mid_block_additional_residual=r.mid_block_additional_residual).sample
    assert not torch.equal(hooked, unet(sample, t, embeds).sample)  # the guide did change something
    torch.testing.assert_close(hooked, explicit, rtol=0, atol=1e-6)
    assert torch.equal(unet(sample, t, embeds).sample, unet(sample, t, embeds).sample)  # hooks are inert between guided calls
    assert unet._pnpguide_feature_tap.guide is None


def test_the_features_read_are_the_unets_skip_connections(unet):
    sample, t, embeds = guide_inputs()
    guide = GuideModel.from_unet(unet, reads="unet_features")
    seen = _recording(guide)
    guided_noise_pred(unet, guide, sample, t, embeds, 4.0)
    expected = residual_channels(unet.config.block_out_channels, unet.config.layers_per_block)
    assert [s.shape[1] for s in seen["features"].skips] == expected
    assert seen["features"].mid.shape == (2, 32, 4, 4)


def test_scale_by_guidance_makes_w_one_exactly_the_unguided_unet(unet):
    guide = randomised(GuideModel.from_unet(unet, reads="unet_features", scale_by_guidance=True))
    sample, t, embeds = guide_inputs()
    plain = unet(sample, t, embeds).sample
    assert torch.equal(plain, guided_noise_pred(unet, guide, sample, t, embeds, 1.0))
    assert not torch.allclose(plain, guided_noise_pred(unet, guide, sample, t, embeds, 3.0))


def test_a_feature_guide_called_without_features_says_how_to_call_it(unet):
    guide = GuideModel.from_unet(unet, reads="unet_features")
    sample, t, embeds = guide_inputs()
    with pytest.raises(ValueError, match="reads the UNet's features: call it through pnpguide.guided_noise_pred"):
        guide(sample, t, embeds, 3.0)


def test_a_feature_guide_refuses_another_unet_in_one_line(unet):
    guide = GuideModel.from_unet(tiny_unet(layers_per_block=2), reads="unet_features")
    with pytest.raises(ValueError, match="guide built for layers_per_block=2, this UNet has 1"):
        guide.check_compatible(unet)


@pytest.mark.parametrize("config, skips", [("sd15", 12), ("sdxl", 9)])
def test_one_head_per_skip_connection_on_sd15_and_sdxl_layouts(config, skips):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15 if config == "sd15" else SDXL))
        guide = GuideModel.from_unet(unet, reads="unet_features")
    c = unet.config
    assert len(guide.skip_heads) == skips == len(residual_channels(c.block_out_channels, c.layers_per_block))
    assert [h.proj_out.out_channels for h in guide.skip_heads] == residual_channels(c.block_out_channels, c.layers_per_block)
    assert all(h.attention is None or h.attention.config.attention_head_dim % 8 == 0 for h in guide.skip_heads)
    assert skip_levels(len(c.block_out_channels), c.layers_per_block)[:4] == [0, 0, 0, 1]


def test_tiny_feature_guide_fits_the_budget_on_sd15():
    from pnpguide.evaluation.speed import step_cost

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15)
        guide = GuideModel.from_unet(sd15, "tiny", reads="unet_features")
    ratio = sum(p.numel() for p in guide.parameters()) / sum(p.numel() for p in sd15.parameters())
    assert ratio <= 0.01
    cost = step_cost(sd15, guide, tokens=77)
    assert cost.guide > 0 and cost.ratio <= 0.505


def test_feature_guide_save_and_load_round_trip(unet, tmp_path):
    guide = randomised(GuideModel.from_unet(unet, reads="unet_features", scale_by_guidance=True))
    guide.save_pretrained(tmp_path / "guide")
    loaded = GuideModel.from_pretrained(tmp_path / "guide")
    assert loaded.config.reads == "unet_features" and loaded.config.scale_by_guidance
    sample, t, embeds = guide_inputs()
    assert torch.equal(guided_noise_pred(unet, guide, sample, t, embeds, 4.0), guided_noise_pred(unet, loaded, sample, t, embeds, 4.0))


def test_a_pipeline_refuses_a_guide_trained_with_another_text_encoder(tiny_components):
    from pnpguide.guide import text_encoder_signature
    from pnpguide.pipeline import PlugAndPlayPipeline

    guide = GuideModel.from_unet(tiny_components["unet"], reads="unet_features")
    guide.register_to_config(trained_text_encoder=text_encoder_signature(tiny_components["text_encoder"]))
    PlugAndPlayPipeline(**tiny_components, guide=guide)  # the same encoder: fine
    guide.register_to_config(trained_text_encoder="BertModel (6 layers, 32 wide, vocab 60)")
    with pytest.raises(ValueError, match=r"with text encoder BertModel \(6 layers, 32 wide, vocab 60\); this base has BertModel \(2 layers"):
        PlugAndPlayPipeline(**tiny_components, guide=guide)


def test_a_pipeline_warns_when_a_trained_guide_does_not_record_its_text_encoder(tiny_components):
    import warnings

    from pnpguide.pipeline import PlugAndPlayPipeline

    guide = GuideModel.from_unet(tiny_components["unet"])
    with warnings.catch_warnings():  # untrained (no guidance range): nothing to say yet
        warnings.filterwarnings("error", message=".*does not record the text encoder")
        PlugAndPlayPipeline(**tiny_components, guide=guide)
    guide.register_to_config(trained_guidance_range=(2.0, 9.0))
    with pytest.warns(UserWarning, match=r"does not record the text encoder .* this base's \(BertModel \(2 layers"):
        PlugAndPlayPipeline(**tiny_components, guide=guide)


def test_a_feature_guide_given_another_unets_features_names_both_counts(unet):
    guide = GuideModel.from_unet(tiny_unet(layers_per_block=2), reads="unet_features")
    sample, t, embeds = guide_inputs()
    with pytest.raises(ValueError, match="the guide reads 6 skip connections, this UNet has 4"):
        guided_noise_pred(unet, guide, sample, t, embeds, 3.0)
