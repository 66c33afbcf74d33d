"""The guide that reads the UNet's output and predicts CFG's term cond - uncond: identity at init, CFG's form in w,
odd latent sizes, SD1.5/SDXL layouts and budget, save/load, and the pipelines and doctor with it."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import guide_inputs, randomised
from pnpguide.evaluation.speed import SD15, SDXL, step_cost
from pnpguide.guide import GuideModel, OutputCorrection, OutputGuide, ResidualGuide
from pnpguide.teacher import guided_noise_pred


def test_an_untrained_output_guide_leaves_the_unet_output_unchanged(unet):
    guide = OutputGuide.from_unet(unet)
    sample, t, embeds = guide_inputs()
    assert torch.equal(unet(sample, t, embeds).sample, guided_noise_pred(unet, guide, sample, t, embeds, torch.tensor([3.0, 8.0])))


def test_the_correction_has_cfgs_form_in_w(unet):
    """cond + (w - 1) * d: w = 1 is exactly the unguided UNet, and the correction grows linearly in w, as CFG's does."""
    guide = randomised(OutputGuide.from_unet(unet))
    sample, t, embeds = guide_inputs()
    plain = unet(sample, t, embeds).sample
    assert torch.equal(plain, guided_noise_pred(unet, guide, sample, t, embeds, 1.0))
    at3 = guided_noise_pred(unet, guide, sample, t, embeds, 3.0) - plain
    at5 = guided_noise_pred(unet, guide, sample, t, embeds, 5.0) - plain
    assert at3.abs().max() > 1e-3
    torch.testing.assert_close(at5, 2 * at3, rtol=1e-4, atol=1e-5)


def test_the_guide_reads_the_unets_output_and_the_prompt(unet):
    guide = randomised(OutputGuide.from_unet(unet))
    sample, t, embeds = guide_inputs()
    output = unet(sample, t, embeds).sample
    correction = guide(sample, t, embeds, 4.0, unet_output=output)
    assert isinstance(correction, OutputCorrection) and correction.sample.shape == output.shape
    assert not torch.allclose(correction.sample, guide(sample, t, embeds, 4.0, unet_output=output + 1).sample)
    assert not torch.allclose(correction.sample, guide(sample, t, embeds + 1, 4.0, unet_output=output).sample)


@pytest.mark.parametrize("height, width", [(9, 9), (5, 12)])
def test_odd_latent_sizes_come_back_at_their_size(unet, height, width):
    guide = randomised(OutputGuide.from_unet(unet))
    sample = torch.randn(1, 4, height, width)
    out = guided_noise_pred(unet, guide, sample, 500, torch.randn(1, 6, 32), 3.0)
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_an_output_guide_called_without_the_output_names_the_missing_argument(unet):
    guide = OutputGuide.from_unet(unet)
    sample, t, embeds = guide_inputs()
    with pytest.raises(TypeError, match="unet_output"):
        guide(sample, t, embeds, 3.0)


@pytest.mark.parametrize("config", ["sd15", "sdxl"])
def test_the_output_guide_fits_the_budget_on_sd15_and_sdxl(config):
    with torch.device("meta"):
        base = UNet2DConditionModel(**(SD15 if config == "sd15" else SDXL))
        guide = OutputGuide.from_unet(base)
    ratio = sum(p.numel() for p in guide.parameters()) / sum(p.numel() for p in base.parameters())
    assert ratio <= 0.01
    cost = step_cost(base, guide, tokens=77)
    assert cost.guide > 0 and cost.ratio <= 0.505
    assert guide.output_head.conv_out.out_channels == base.config.out_channels == 4


def test_output_guide_save_and_load_round_trip(unet, tmp_path):
    guide = randomised(OutputGuide.from_unet(unet))
    guide.save_pretrained(tmp_path / "guide")
    loaded = GuideModel.from_pretrained(tmp_path / "guide")
    assert isinstance(loaded, OutputGuide) and loaded.config.unet_out_channels == 4
    sample, t, embeds = guide_inputs()
    assert torch.equal(guided_noise_pred(unet, guide, sample, t, embeds, 4.0), guided_noise_pred(unet, loaded, sample, t, embeds, 4.0))


def test_an_output_guide_with_a_negative_head_sees_the_negative(unet):
    guide = randomised(OutputGuide.from_unet(unet).with_negative_head())
    sample, t, embeds = guide_inputs()
    one = guided_noise_pred(unet, guide, sample, t, embeds, 4.0, negative_prompt_embeds=torch.zeros(1, 6, 32))
    other = guided_noise_pred(unet, guide, sample, t, embeds, 4.0, negative_prompt_embeds=torch.ones(1, 6, 32))
    assert not torch.allclose(one, other)


def test_the_pipeline_samples_with_an_output_guide_and_doctor_passes_it(tiny_components):
    from pnpguide.doctor import _residuals
    from pnpguide.pipeline import PlugAndPlayPipeline

    guide = randomised(OutputGuide.from_unet(tiny_components["unet"]))
    pipe = PlugAndPlayPipeline(**tiny_components, guide=guide)
    images = lambda g: pipe("a red circle", num_inference_steps=3, guidance_scale=g, output_type="np",  # noqa: E731
                            generator=torch.Generator().manual_seed(0)).images
    assert images(4.0).shape[-1] == 3 and not (images(4.0) == images(1.0)).all()
    check = _residuals(guide, tiny_components["unet"])
    assert check.ok and "output" in check.detail


@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_active_lora_weights_are_warned_about_until_measured_near_the_base_at_the_scale_used(tiny_components, design):
    """A guide distilled on the base carries to a fine-tune only near it: unmeasured LoRA weights in use are warned
    about with their scale; once measured, only a distance beyond REACH at the call's scale is; at scale 0 (set_adapters
    or the call's cross_attention_kwargs) or once unloaded, nothing."""
    import copy
    import warnings

    from peft import LoraConfig

    from pnpguide.pipeline import REACH, LoraReach, PlugAndPlayPipeline

    unet = copy.deepcopy(tiny_components["unet"])
    pipe = PlugAndPlayPipeline(**(tiny_components | {"unet": unet}), guide=design.from_unet(unet))

    def lora_warnings(**call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe("a red circle", num_inference_steps=2, guidance_scale=4.0, output_type="latent", **call)
        return [str(w.message) for w in caught if "LoRA weights are active" in str(w.message)]

    assert lora_warnings() == []
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]), adapter_name="style")
    (message,) = lora_warnings()
    assert "(scale 1)" in message and "not measured" in message and "pnpguide doctor --lora" in message
    (message,) = lora_warnings(cross_attention_kwargs={"scale": 0.5})
    assert "(scale 0.5)" in message
    assert lora_warnings(cross_attention_kwargs={"scale": 0.0}) == []
    pipe.lora_reach = LoraReach(1.2, ("style",), 1.0)  # measured at scale 1: beyond reach there, 1.2 * 0.5^1.5 = 0.42 at 0.5
    (message,) = lora_warnings()
    assert "distance 1.20" in message and f"reach ({REACH:g})" in message
    assert lora_warnings(cross_attention_kwargs={"scale": 0.5}) == []
    assert pipe.lora_reach.at(("style",), 0.5) == pytest.approx(1.2 * 0.5**1.5)
    pipe.lora_reach = LoraReach(0.3, ("style",), 0.5)  # measured at 0.5: 0.3 * 2^2 = 1.2 at scale 1
    assert "distance 1.20" in lora_warnings()[0]
    pipe.lora_reach = LoraReach(1.2, ("another",), 1.0)  # measured for other adapters: not this one's distance
    assert "not measured" in lora_warnings()[0]
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert lora_warnings() == []
    unet.unload_lora()
    assert lora_warnings() == []


def test_the_shipped_output_guide_brings_the_embedded_models_output_most_of_the_way_to_cfg_at_the_first_step():
    """Integration: at pure noise (t = 999), where CFG's correction is largest, the shipped guide closes most of it."""
    from pnpguide.conditioning import encode_negative, encode_prompts
    from pnpguide.loading import load_guide, load_pipeline
    from pnpguide.teacher import cfg_noise_pred

    pipe, guide = load_pipeline(None), load_guide("default")
    assert isinstance(guide, OutputGuide)
    prompts = ["a red circle on a black background", "a blue triangle above a yellow square on a white background"] * 4
    conditioning, negative = encode_prompts(pipe, prompts, "cpu", 64), encode_negative(pipe, "cpu", 64)
    sample = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cfg = cfg_noise_pred(pipe.unet, sample, 999, conditioning.prompt_embeds, negative.expand(len(prompts)).prompt_embeds, 7.5)
        plain = pipe.unet(sample, 999, conditioning.prompt_embeds).sample
        guided = guided_noise_pred(pipe.unet, guide, sample, 999, conditioning.prompt_embeds, 7.5)
    gap_closed = 1 - (guided - cfg).pow(2).mean() / (plain - cfg).pow(2).mean()
    assert gap_closed > 0.7, f"closed {gap_closed:.3f} of the first step's gap"
