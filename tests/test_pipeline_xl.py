"""PlugAndPlayXLPipeline on a random SDXL-layout folder: the same modes and properties as PlugAndPlayPipeline."""

import numpy as np
import pytest
import torch

from pnpguide.guide import GuideModel
from pnpguide.loading import load_pipeline
from pnpguide.pipeline_xl import PlugAndPlayXLPipeline

PROMPTS = ["a red cat", "a cat on a car"]


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    pipe = load_pipeline(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _trained(guide):
    torch.manual_seed(3)  # stand-in for training: non-zero projections make the guide change the output
    for p in guide.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return guide


def _pipe(sdxl, guide=None):
    pipe = PlugAndPlayXLPipeline.from_pipe(sdxl, guide=guide)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    args = dict(prompt=PROMPTS, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    return pipe(**(args | kwargs)).images


def test_cfg_mode_reproduces_the_diffusers_sdxl_pipeline(sdxl):
    expected = _run(sdxl, guidance_scale=6.0)
    got = _run(_pipe(sdxl, GuideModel.from_unet(sdxl.unet, "tiny")), guidance_scale=6.0, mode="cfg")
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cfg_mode_reproduces_diffusers_at_a_non_square_size_with_a_negative_prompt(sdxl):
    kwargs = dict(guidance_scale=4.0, height=48, width=80, negative_prompt="a car")
    expected = _run(sdxl, **kwargs)
    got = _run(_pipe(sdxl), mode="cfg", **kwargs)
    assert got.shape == (2, 48, 80, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_none_mode_is_the_diffusers_pipeline_at_w_1(sdxl):
    np.testing.assert_allclose(_run(_pipe(sdxl), mode="none"), _run(sdxl, guidance_scale=1.0), atol=1e-5)


@pytest.mark.parametrize("reads", ["latent", "unet_features", "unet_output"])
def test_an_untrained_guide_gives_the_unguided_image(sdxl, reads):
    pipe = _pipe(sdxl, GuideModel.from_unet(sdxl.unet, "tiny", reads=reads))
    np.testing.assert_array_equal(_run(pipe, guidance_scale=6.0), _run(pipe, guidance_scale=6.0, mode="none"))


@pytest.mark.parametrize("reads", ["latent", "unet_features", "unet_output"])
def test_a_trained_guide_changes_the_image_in_one_unet_call_per_step(sdxl, reads):
    pipe = _pipe(sdxl, _trained(GuideModel.from_unet(sdxl.unet, "tiny", reads=reads)))
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        guided = _run(pipe, guidance_scale=6.0)
    finally:
        handle.remove()
    assert calls == [2] * 3  # 2 prompts, 3 steps, no doubled CFG batch
    assert np.abs(guided - _run(pipe, guidance_scale=6.0, mode="none")).max() > 1e-3
    np.testing.assert_array_equal(_run(pipe, guidance_scale=1.0), _run(pipe, mode="none"))


def test_the_latent_guide_reads_sdxls_size_conditioning(sdxl):
    """A latent-reading SDXL guide embeds text_embeds and time_ids as SDXL's UNet does: other sizes, other residuals."""
    guide = _trained(GuideModel.from_unet(sdxl.unet, "tiny"))
    sample, embeds = torch.randn(1, 4, 8, 8), torch.randn(1, 77, sdxl.unet.config.cross_attention_dim)
    added = lambda size: {"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)}  # noqa: E731
    small, large = (guide(sample, 500, embeds, 5.0, added_cond_kwargs=added(s)).mid_block_additional_residual for s in (64, 1024))
    assert (small - large).abs().max() > 1e-4
    with pytest.raises(ValueError, match="added_cond_kwargs with 'text_embeds' and 'time_ids'"):
        guide(sample, 500, embeds, 5.0)


def test_a_guidance_schedule_and_interval_work_as_for_sd(sdxl):
    pipe = _pipe(sdxl, _trained(GuideModel.from_unet(sdxl.unet, "tiny")))
    outside = _run(pipe, guidance_scale=[5.0, 5.0, 5.0], guidance_interval=(900, 1000))  # Euler samples t = 667, 334, 1: none inside, all w = 1
    np.testing.assert_array_equal(outside, _run(pipe, mode="none"))
    with pytest.raises(ValueError, match="guidance_scale has 2 values but sampling takes 3 steps"):
        _run(pipe, guidance_scale=[5.0, 5.0])


def test_a_guides_default_interval_applies_as_for_sd_and_a_negative_prompt_lifts_it(sdxl):
    guide = _trained(GuideModel.from_unet(sdxl.unet, "tiny", reads="unet_output")).with_negative_head()
    torch.nn.init.normal_(guide.negative_output_head.conv_out.weight, std=0.05)
    pipe = _pipe(sdxl, guide)
    every_step = _run(pipe, guidance_scale=5.0)
    guide.register_to_config(default_guidance_interval=(500, 1000))  # Euler samples t = 667, 334, 1: one guided step
    np.testing.assert_array_equal(_run(pipe, guidance_scale=5.0), _run(pipe, guidance_scale=5.0, guidance_interval=(500, 1000)))
    assert np.abs(_run(pipe, guidance_scale=5.0) - every_step).max() > 1e-4
    negative = ["blurry", "blurry"]
    np.testing.assert_array_equal(_run(pipe, guidance_scale=5.0, negative_prompt=negative),
                                  _run(pipe, guidance_scale=5.0, negative_prompt=negative, guidance_interval=(0, 1000)))


def test_an_output_guide_warns_on_sdxl_when_lora_weights_are_loaded(sdxl):
    from peft import LoraConfig

    pipe = _pipe(sdxl, GuideModel.from_unet(sdxl.unet, "tiny", reads="unet_output"))
    sdxl.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    try:
        with pytest.warns(UserWarning, match="LoRA weights are loaded and this is an output guide"):
            _run(pipe, guidance_scale=5.0)
    finally:
        sdxl.unet.unload_lora()  # the module's other tests share this UNet


def test_save_and_load_with_guide(sdxl, tmp_path):
    pipe = _pipe(sdxl, _trained(GuideModel.from_unet(sdxl.unet, "tiny")))
    pipe.save_pretrained(tmp_path / "pnp")
    loaded = PlugAndPlayXLPipeline.from_pretrained(tmp_path / "pnp")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.guide, GuideModel)
    np.testing.assert_allclose(_run(loaded, guidance_scale=5.0), _run(pipe, guidance_scale=5.0), atol=1e-6)


@torch.no_grad()
def test_mode_noise_pred_takes_sdxls_added_conditioning(sdxl):
    pipe = _pipe(sdxl, GuideModel.from_unet(sdxl.unet, "tiny"))
    sample, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 77, sdxl.unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    negative = {"text_embeds": torch.zeros(2, 32), "time_ids": added["time_ids"]}
    plain = pipe.mode_noise_pred("none", sample, 500, embeds, None, 1.0, added)
    torch.testing.assert_close(pipe.mode_noise_pred("guide", sample, 500, embeds, None, 5.0, added), plain, atol=0, rtol=0)  # untrained guide
    cfg_at_1 = pipe.mode_noise_pred("cfg", sample, 500, embeds, torch.zeros_like(embeds), 1.0, added, negative)
    torch.testing.assert_close(cfg_at_1, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs negative_added_cond_kwargs"):
        pipe.mode_noise_pred("cfg", sample, 500, embeds, torch.zeros_like(embeds), 5.0, added)


def test_the_sdxl_pipeline_is_exported_beside_the_sd_one():
    import pnpguide

    from pnpguide import PlugAndPlayXLPipeline as exported

    assert exported is PlugAndPlayXLPipeline and "PlugAndPlayXLPipeline" in pnpguide.__all__
    assert pnpguide.PlugAndPlayPipeline.__name__ == "PlugAndPlayPipeline"  # the SD one beside it


@pytest.mark.parametrize("reads", ["latent", "unet_features", "unet_output"])
def test_a_guide_that_reads_negatives_uses_the_negative_prompt_in_one_unet_call_per_step(sdxl, reads):
    guide = GuideModel.from_unet(sdxl.unet, "tiny", reads=reads, reads_negative=True)
    torch.manual_seed(3)
    for p in guide.parameters():
        torch.nn.init.normal_(p, std=0.3)
    pipe = _pipe(sdxl, guide)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        negated = _run(pipe, guidance_scale=6.0, negative_prompt="a car")
    finally:
        handle.remove()
    assert calls == [2] * 3
    assert np.abs(negated - _run(pipe, guidance_scale=6.0)).max() > 1e-3


def test_an_output_guides_negative_head_acts_on_sdxl_only_where_there_is_a_negative(sdxl):
    plain = _trained(GuideModel.from_unet(sdxl.unet, "tiny", reads="unet_output"))
    headed = plain.with_negative_head()
    torch.manual_seed(4)
    for p in headed.negative_output_head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    without = _run(_pipe(sdxl, plain), guidance_scale=6.0)
    pipe = _pipe(sdxl, headed)
    np.testing.assert_array_equal(without, _run(pipe, guidance_scale=6.0))  # SDXL's empty negative (zeros): no head
    assert np.abs(without - _run(pipe, guidance_scale=6.0, negative_prompt="a car")).max() > 1e-3


def test_cfg_first_steps_use_sdxls_negative_conditioning_then_the_guide(sdxl):
    pipe = _pipe(sdxl, guide=_trained(GuideModel.from_unet(sdxl.unet, "tiny")))
    outputs = {}

    def record(name):
        return lambda t, x, out, *rest: outputs.setdefault(name, []).append(out)

    negative = ["a dog"] * len(PROMPTS)
    hybrid = _run(pipe, guidance_scale=5.0, cfg_first_steps=1, negative_prompt=negative, on_model_output=record("hybrid"))
    _run(pipe, guidance_scale=5.0, mode="cfg", negative_prompt=negative, on_model_output=record("cfg"))
    torch.testing.assert_close(outputs["hybrid"][0], outputs["cfg"][0])
    assert not torch.allclose(outputs["hybrid"][1], outputs["cfg"][1], atol=1e-4)
    assert not np.allclose(hybrid, _run(pipe, guidance_scale=5.0), atol=1e-3)


def test_a_first_step_fit_runs_sdxls_first_step_as_cfg_in_one_unet_pass(sdxl):
    from pnpguide import FirstStepFit
    from pnpguide.teacher import cfg_combine

    pipe = _pipe(sdxl, guide=_trained(GuideModel.from_unet(sdxl.unet, "tiny")))
    fit = FirstStepFit.fit(pipe, height=64, width=96, num_inference_steps=3, num_samples=6)  # SDXL's time ids at this size
    assert fit.bias.shape[1:] == (8, 12)
    steps, batches = [], []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    image = _run(pipe, guidance_scale=5.0, height=64, width=96, first_step_fit=fit, on_model_output=lambda *a: steps.append(a))
    hook.remove()
    assert batches == [2] * 3
    t, x, out, embeds, added = steps[0]
    with torch.no_grad():
        cond = pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    torch.testing.assert_close(out, cfg_combine(fit(x), cond, 5.0))
    assert not np.allclose(image, _run(pipe, guidance_scale=5.0, height=64, width=96), atol=1e-3)
    with pytest.raises(ValueError, match=r"made for latents of \(4, 8, 12\), not \(4, 8, 8\)"):
        _run(pipe, guidance_scale=5.0, first_step_fit=fit)


def test_a_correction_carry_runs_sdxl_in_one_unet_pass_after_its_full_steps(sdxl):
    from pnpguide import CorrectionCarry

    pipe = _pipe(sdxl)
    carry = CorrectionCarry.fit(pipe, ["a cat", "a red car"], full_steps=1, num_inference_steps=3, height=64, width=96)
    assert len(carry.factors) == 3 and not np.allclose(carry.factors[1:], 1.0, atol=1e-3)
    batches = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    carried = _run(pipe, guidance_scale=5.0, mode="cfg", height=64, width=96, correction_carry=carry)
    hook.remove()
    assert batches == [4, 2, 2]
    assert not np.allclose(carried, _run(pipe, guidance_scale=5.0, mode="cfg", height=64, width=96), atol=1e-4)
    assert not np.allclose(carried, _run(pipe, guidance_scale=1.0, height=64, width=96), atol=1e-4)


def test_an_output_guides_correction_is_carried_on_sdxl_after_its_full_steps(sdxl):
    from pnpguide import CorrectionCarry

    pipe = _pipe(sdxl, _trained(GuideModel.from_unet(sdxl.unet, "tiny", reads="unet_output")))
    carry = CorrectionCarry.fit(pipe, ["a cat", "a red car"], full_steps=1, num_inference_steps=3, height=64, width=96)
    batches, guide_calls = [], []
    hooks = [pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0])),
             pipe.guide.register_forward_hook(lambda *args: guide_calls.append(1))]
    carried = _run(pipe, guidance_scale=5.0, height=64, width=96, correction_carry=carry)
    for hook in hooks:
        hook.remove()
    assert batches == [2, 2, 2] and len(guide_calls) == 1  # one UNet pass a step; the guide at the first step only
    every_step = _run(pipe, guidance_scale=5.0, height=64, width=96)
    assert not np.allclose(carried, every_step, atol=1e-4)  # the later steps carry the correction, not the guide's
    assert not np.allclose(carried, _run(pipe, guidance_scale=1.0, height=64, width=96), atol=1e-4)
