import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import tiny_unet
from pnpguide.evaluation.speed import SD15
from pnpguide.guide import GuideModel, residual_channels
from pnpguide.teacher import guided_noise_pred


def _inputs(batch=2, dim=32):
    torch.manual_seed(1)
    return torch.randn(batch, 4, 8, 8), torch.tensor([10, 700])[:batch], torch.randn(batch, 6, dim)


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_an_untrained_guide_leaves_the_unet_output_unchanged(unet, size):
    guide = GuideModel.from_unet(unet, size=size)
    sample, t, embeds = _inputs()
    plain = unet(sample, t, embeds).sample
    guided = guided_noise_pred(unet, guide, sample, t, embeds, torch.tensor([3.0, 8.0]))
    assert torch.equal(plain, guided)


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_residuals_match_the_unet_skip_connections(unet, size):
    guide = GuideModel.from_unet(unet, size=size)
    sample, t, embeds = _inputs()
    out = guide(sample, t, embeds, 5.0)
    expected = residual_channels(unet.config.block_out_channels, unet.config.layers_per_block)
    assert [r.shape[1] for r in out.down_block_additional_residuals] == expected
    assert out.mid_block_additional_residual.shape == (2, 32, 4, 4)


def test_full_guide_starts_from_the_unet_encoder_weights(unet):
    guide = GuideModel.from_unet(unet, size="full")
    assert torch.equal(guide.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(guide.down_blocks[1].attentions[0].proj_in.weight, unet.down_blocks[1].attentions[0].proj_in.weight)


def test_guidance_scale_changes_the_guide_output(unet):
    guide = GuideModel.from_unet(unet, size="tiny")
    torch.nn.init.normal_(guide.mid_projection.weight)  # non-zero, so that w becomes visible
    sample, t, embeds = _inputs()
    a = guide(sample, t, embeds, 2.0).mid_block_additional_residual
    b = guide(sample, t, embeds, 9.0).mid_block_additional_residual
    assert not torch.allclose(a, b)


def test_tiny_guide_is_at_most_one_percent_of_sd15():
    with torch.device("meta"):  # SD1.5's published config; shapes are all a parameter count needs
        sd15 = _sd15()
    ratio = sum(p.numel() for p in GuideModel.from_unet(sd15, "tiny").parameters()) / sum(p.numel() for p in sd15.parameters())
    assert ratio <= 0.01


def test_tiny_guide_costs_at_most_half_a_percent_more_than_half_of_cfg_on_sd15():
    from pnpguide.evaluation.speed import step_cost

    with torch.device("meta"):
        sd15 = _sd15()
        cost = step_cost(sd15, GuideModel.from_unet(sd15, "tiny"), tokens=77)
    assert cost.unet > 800e9  # SD1.5: ~803 GFLOPs per 64x64 latent with attention counted
    assert cost.ratio <= 0.505


def test_a_full_output_guide_for_five_of_25_steps_then_carried_fits_the_tiny_budget_on_sd15():
    """At every step the full output guide costs too much (ratio > 0.505); for the first five steps only, it does not."""
    from pnpguide.evaluation.speed import parameter_count, step_cost

    with torch.device("meta"):
        sd15 = _sd15()
        guide = GuideModel.from_unet(sd15, "full", reads="unet_output")
        cost = step_cost(sd15, guide, tokens=77)
    assert cost.ratio > 0.505 and cost.sampling_ratio(25, 25) == pytest.approx(cost.ratio)
    assert cost.sampling_ratio(25, 5) <= 0.505
    assert parameter_count(guide) <= 0.01 * parameter_count(sd15)


def _sd15():
    return UNet2DConditionModel(**SD15)


def test_plugging_into_another_architecture_is_a_clear_error(unet):
    guide = GuideModel.from_unet(unet, size="tiny")
    other = tiny_unet(cross_attention_dim=48)
    with pytest.raises(ValueError, match="guide built for cross_attention_dim=32, this UNet has 48"):
        guide.check_compatible(other)


def test_save_and_load_round_trip(unet, tmp_path):
    guide = GuideModel.from_unet(unet, size="tiny")
    for p in guide.parameters():
        torch.nn.init.normal_(p, std=0.02)
    guide.save_pretrained(tmp_path / "guide")
    assert (tmp_path / "guide" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = GuideModel.from_pretrained(tmp_path / "guide")
    sample, t, embeds = _inputs()
    assert torch.equal(guide(sample, t, embeds, 4.0).mid_block_additional_residual, loaded(sample, t, embeds, 4.0).mid_block_additional_residual)


@pytest.mark.parametrize("bad", [dict(size="huge"), dict(block_out_channels=(16,)), dict(block_out_channels=(12, 16, 16))])
def test_bad_config_raises_value_error(bad):
    with pytest.raises(ValueError):
        GuideModel(**bad)
