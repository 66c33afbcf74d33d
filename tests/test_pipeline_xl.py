"""PlugAndPlayXLPipeline on a random SDXL-layout folder: a drop-in for diffusers' StableDiffusionXLPipeline (every argument;
diffusers' own image in CFG mode), and the same modes and policy as PlugAndPlayPipeline."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from conftest import randomised
from dropin import add_random_ip_adapter, image_embeds, scale_latents_at_step
from pnpguide import CorrectionCarry, GuidancePolicy, GuideModel, OutputGuide, PlugAndPlayXLPipeline, ResidualGuide
from pnpguide.loading import load_pipeline

PROMPTS = ["a red cat", "a cat on a car"]


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    pipe = load_pipeline(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe(sdxl, guide=None):
    pipe = PlugAndPlayXLPipeline.from_pipe(sdxl, guide=guide)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    args = dict(prompt=PROMPTS, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    return pipe(**(args | kwargs)).images


def test_the_call_takes_every_argument_of_diffusers_call():
    ours, theirs = inspect.signature(PlugAndPlayXLPipeline.__call__).parameters, inspect.signature(StableDiffusionXLPipeline.__call__).parameters
    assert set(theirs) <= set(ours) and set(ours) - set(theirs) == {"mode", "policy"}
    assert all(ours[name].default == theirs[name].default for name in theirs if name != "num_inference_steps")


def _embeds(sdxl):
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(names, sdxl.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt="a dog")))


ARGUMENTS = {  # one case per diffusers argument (beyond prompt, steps, generator and output_type, which every test passes)
    "prompt_2": lambda sdxl: dict(prompt_2=["a blue car", "a dog"]),
    "negative_prompt": lambda sdxl: dict(negative_prompt="a car", negative_prompt_2="a dog"),
    "embeds": lambda sdxl: dict(prompt=None, **_embeds(sdxl)),
    "height_width": lambda sdxl: dict(height=48, width=80),
    "guidance_rescale": lambda sdxl: dict(guidance_rescale=0.7),
    "num_images_per_prompt": lambda sdxl: dict(num_images_per_prompt=2),
    "latents": lambda sdxl: dict(latents=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))),
    "sizes": lambda sdxl: dict(original_size=(128, 96), crops_coords_top_left=(8, 0), target_size=(96, 64)),
    # one prompt: with several, diffusers repeats [negative; prompt] time ids per image, so its rows pair them up crosswise
    "negative_sizes": lambda sdxl: dict(prompt=PROMPTS[0], negative_original_size=(32, 32), negative_crops_coords_top_left=(4, 4), negative_target_size=(32, 32)),
    "denoising_end": lambda sdxl: dict(denoising_end=0.5, output_type="latent"),
    "clip_skip": lambda sdxl: dict(clip_skip=1),
    "callback_on_step_end": lambda sdxl: dict(callback_on_step_end=scale_latents_at_step(1)),
    "callback_tensor_inputs": lambda sdxl: dict(callback_on_step_end=_scale_conditioning, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]),
    "legacy_callback": lambda sdxl: dict(callback=lambda i, t, latents: latents.mul_(0.9), callback_steps=2),
    "return_dict": lambda sdxl: dict(return_dict=False),
}


def _scale_conditioning(pipe, i, t, tensors):
    """A callback that changes SDXL's conditioning it is given ([negative; prompt] in CFG, as diffusers holds it)."""
    if i == 0:
        tensors["add_text_embeds"] = tensors["add_text_embeds"] * 2
        tensors["prompt_embeds"] = tensors["prompt_embeds"] * 1.5
    return tensors


def _images(output):
    return np.asarray(output[0] if isinstance(output, tuple) else output.images)


@pytest.mark.parametrize("argument", list(ARGUMENTS))
def test_cfg_mode_gives_diffusers_image_with_each_argument(sdxl, argument):
    args = dict(prompt=PROMPTS, num_inference_steps=3, output_type="np", guidance_scale=6.0) | ARGUMENTS[argument](sdxl)
    ours = _images(_pipe(sdxl)(mode="cfg", generator=torch.Generator().manual_seed(0), **args))
    theirs = _images(sdxl(generator=torch.Generator().manual_seed(0), **args))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    plain = _images(_pipe(sdxl)(prompt=args["prompt"] or PROMPTS, num_inference_steps=3, output_type=args["output_type"], guidance_scale=6.0, mode="cfg",
                                generator=torch.Generator().manual_seed(0)))
    if argument != "return_dict":  # the argument changed the image, so the equality tested it
        assert ours.shape != plain.shape or not np.allclose(ours, plain, atol=1e-4)


def test_cfg_mode_gives_diffusers_image_with_ip_adapter_embeds(sdxl_dir):
    sdxl = load_pipeline(sdxl_dir)  # its own copy: the adapter changes the UNet
    sdxl.set_progress_bar_config(disable=True)
    add_random_ip_adapter(sdxl.unet)
    args = dict(guidance_scale=6.0, ip_adapter_image_embeds=image_embeds())
    np.testing.assert_allclose(_run(_pipe(sdxl), mode="cfg", **args), _run(sdxl, **args), atol=1e-5)


def test_none_mode_is_the_diffusers_pipeline_at_w_1(sdxl):
    np.testing.assert_allclose(_run(_pipe(sdxl), mode="none"), _run(sdxl, guidance_scale=1.0), atol=1e-5)


@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_an_untrained_guide_gives_the_unguided_image(sdxl, design):
    pipe = _pipe(sdxl, design.from_unet(sdxl.unet))
    np.testing.assert_array_equal(_run(pipe, guidance_scale=6.0), _run(pipe, guidance_scale=6.0, mode="none"))


@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_a_trained_guide_changes_the_image_in_one_unet_call_per_step(sdxl, design):
    pipe = _pipe(sdxl, randomised(design.from_unet(sdxl.unet)))
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        guided = _run(pipe, guidance_scale=6.0)
    finally:
        handle.remove()
    assert calls == [2] * 3  # 2 prompts, 3 steps, no doubled CFG batch
    assert np.abs(guided - _run(pipe, guidance_scale=6.0, mode="none")).max() > 1e-3
    np.testing.assert_array_equal(_run(pipe, guidance_scale=1.0), _run(pipe, mode="none"))


@pytest.mark.parametrize("argument", ["prompt_2", "sizes", "guidance_rescale", "callback_on_step_end", "clip_skip", "denoising_end"])
def test_guide_mode_applies_each_argument(sdxl, argument):
    pipe = _pipe(sdxl, randomised(OutputGuide.from_unet(sdxl.unet)))
    args = dict(guidance_scale=6.0) | ARGUMENTS[argument](sdxl)
    with_it, without = _run(pipe, **args), _run(pipe, guidance_scale=6.0, output_type=args.get("output_type", "np"))
    assert with_it.shape != without.shape or not np.allclose(with_it, without, atol=1e-4)


def test_the_residual_guide_reads_sdxls_size_conditioning(sdxl):
    """A residual SDXL guide embeds text_embeds and time_ids as SDXL's UNet does: other sizes, other residuals."""
    guide = randomised(ResidualGuide.from_unet(sdxl.unet))
    sample, embeds = torch.randn(1, 4, 8, 8), torch.randn(1, 77, sdxl.unet.config.cross_attention_dim)
    added = lambda size: {"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)}  # noqa: E731
    small, large = (guide(sample, 500, embeds, 5.0, added_cond_kwargs=added(s)).mid_block_additional_residual for s in (64, 1024))
    assert (small - large).abs().max() > 1e-4
    with pytest.raises(ValueError, match="added_cond_kwargs with 'text_embeds' and 'time_ids'"):
        guide(sample, 500, embeds, 5.0)


def test_a_guides_interval_applies_as_for_sd_and_a_negative_prompt_lifts_it(sdxl):
    guide = randomised(OutputGuide.from_unet(sdxl.unet)).with_negative_head()
    torch.nn.init.normal_(guide.negative_output_head.conv_out.weight, std=0.05)
    pipe = _pipe(sdxl, guide)
    every_step = _run(pipe, guidance_scale=5.0)
    guide.register_to_config(default_guidance_interval=(500, 1000))  # Euler samples t = 667, 334, 1: one guided step
    inside = _run(pipe, guidance_scale=5.0)
    np.testing.assert_array_equal(inside, _run(pipe, guidance_scale=5.0, policy=GuidancePolicy(interval=(500, 1000))))
    assert np.abs(inside - every_step).max() > 1e-4
    negative = ["blurry", "blurry"]
    np.testing.assert_array_equal(_run(pipe, guidance_scale=5.0, negative_prompt=negative),
                                  _run(pipe, guidance_scale=5.0, negative_prompt=negative, policy=GuidancePolicy()))


def test_save_and_load_with_guide(sdxl, tmp_path):
    pipe = _pipe(sdxl, randomised(ResidualGuide.from_unet(sdxl.unet)))
    pipe.save_pretrained(tmp_path / "pnp")
    loaded = PlugAndPlayXLPipeline.from_pretrained(tmp_path / "pnp")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.guide, GuideModel)
    np.testing.assert_allclose(_run(loaded, guidance_scale=5.0), _run(pipe, guidance_scale=5.0), atol=1e-6)


def test_the_sdxl_pipeline_is_exported_beside_the_sd_one():
    import pnpguide

    assert pnpguide.PlugAndPlayXLPipeline is PlugAndPlayXLPipeline and "PlugAndPlayXLPipeline" in pnpguide.__all__
    assert pnpguide.PlugAndPlayPipeline.__name__ == "PlugAndPlayPipeline"  # the SD one beside it


def test_an_output_guides_negative_head_acts_on_sdxl_only_where_there_is_a_negative(sdxl):
    plain = randomised(OutputGuide.from_unet(sdxl.unet))
    headed = plain.with_negative_head()
    torch.manual_seed(4)
    for p in headed.negative_output_head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    without = _run(_pipe(sdxl, plain), guidance_scale=6.0)
    pipe = _pipe(sdxl, headed)
    np.testing.assert_array_equal(without, _run(pipe, guidance_scale=6.0))  # SDXL's empty negative (zeros): no head
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    negated = _run(pipe, guidance_scale=6.0, negative_prompt="a car")
    handle.remove()
    assert calls == [2] * 3 and np.abs(without - negated).max() > 1e-3


def test_a_correction_carry_runs_sdxl_in_one_unet_pass_after_its_full_steps(sdxl):
    pipe = _pipe(sdxl)
    carry = CorrectionCarry.fit(pipe, ["a cat", "a red car"], full_steps=1, num_inference_steps=3, height=64, width=96)
    assert len(carry.factors) == 3 and not np.allclose(carry.factors[1:], 1.0, atol=1e-3)
    batches = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    carried = _run(pipe, guidance_scale=5.0, mode="cfg", height=64, width=96, policy=GuidancePolicy(carry=carry))
    hook.remove()
    assert batches == [4, 2, 2]
    assert not np.allclose(carried, _run(pipe, guidance_scale=5.0, mode="cfg", height=64, width=96), atol=1e-4)
    assert not np.allclose(carried, _run(pipe, guidance_scale=1.0, height=64, width=96), atol=1e-4)


def test_an_output_guides_correction_is_carried_on_sdxl_after_its_full_steps(sdxl):
    pipe = _pipe(sdxl, randomised(OutputGuide.from_unet(sdxl.unet)))
    carry = CorrectionCarry.fit(pipe, ["a cat", "a red car"], full_steps=1, num_inference_steps=3, height=64, width=96)
    batches, guide_calls = [], []
    hooks = [pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0])),
             pipe.guide.register_forward_hook(lambda *args: guide_calls.append(1))]
    carried = _run(pipe, guidance_scale=5.0, height=64, width=96, policy=GuidancePolicy(carry=carry))
    for hook in hooks:
        hook.remove()
    assert batches == [2, 2, 2] and len(guide_calls) == 1  # one UNet pass a step; the guide at the first step only
    every_step = _run(pipe, guidance_scale=5.0, height=64, width=96)
    assert not np.allclose(carried, every_step, atol=1e-4)  # the later steps carry the correction, not the guide's
    assert not np.allclose(carried, _run(pipe, guidance_scale=1.0, height=64, width=96), atol=1e-4)


def test_adaptive_guidance_runs_on_sdxl(sdxl):
    pipe = _pipe(sdxl)
    batches = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    _run(pipe, guidance_scale=5.0, policy=GuidancePolicy(adaptive_threshold=-0.99))
    hook.remove()
    assert batches == [4, 2, 2]
