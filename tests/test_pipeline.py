"""PlugAndPlayPipeline: a drop-in for diffusers' StableDiffusionPipeline (every argument; diffusers' own image in CFG mode),
the guide designs in one UNet pass per step, and the policy (a guide's own by default, or the call's)."""

import inspect
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UniPCMultistepScheduler
from diffusers.callbacks import SDCFGCutoffCallback

from conftest import randomised
from dropin import add_random_ip_adapter, add_random_lora, image_embeds, scale_latents_at_step
from pnpguide import CorrectionCarry, GuidancePolicy, OutputGuide, PlugAndPlayPipeline, ResidualGuide

PROMPTS = ["a red circle on a black background", "a blue square above a green triangle on a white background"]
TIMESTEPS = [999, 749, 499, 249]  # the tiny scheduler's 4 "trailing" steps


def _pipe(components, design=OutputGuide, trained=False, guide=True):
    guide = design.from_unet(components["unet"]) if guide else None
    pipe = PlugAndPlayPipeline(**components, guide=randomised(guide) if trained else guide)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(components):
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    args = dict(prompt=PROMPTS, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0))
    return pipe(**(args | kwargs)).images


def _unet_batches(pipe) -> list[int]:
    batches = []
    pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    return batches


# -- a drop-in for diffusers' pipeline ------------------------------------------------------------------------------

def test_the_call_takes_every_argument_of_diffusers_call():
    ours, theirs = inspect.signature(PlugAndPlayPipeline.__call__).parameters, inspect.signature(StableDiffusionPipeline.__call__).parameters
    assert set(theirs) <= set(ours)
    assert set(ours) - set(theirs) == {"mode", "policy"}
    assert all(ours[name].default == theirs[name].default for name in theirs if name not in ("num_inference_steps",))


def test_cfg_mode_reproduces_stable_diffusion_pipeline(tiny_components):
    np.testing.assert_allclose(_run(_pipe(tiny_components), guidance_scale=6.0, mode="cfg"), _run(_diffusers(tiny_components), guidance_scale=6.0), atol=1e-5)


def _embeds(components):
    pipe = _diffusers(components)
    return dict(zip(("prompt_embeds", "negative_prompt_embeds"), pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["blue", "red"])))


ARGUMENTS = {  # one case per diffusers argument (beyond prompt, steps, generator and output_type, which every test passes)
    "guidance_rescale": lambda components: dict(guidance_rescale=0.7),
    "eta": lambda components: dict(eta=0.6),
    "num_images_per_prompt": lambda components: dict(num_images_per_prompt=2),
    "negative_prompt": lambda components: dict(negative_prompt=["blue", "red"]),
    "prompt_embeds": lambda components: dict(prompt=None, **_embeds(components)),
    "latents": lambda components: dict(latents=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))),
    "height_width": lambda components: dict(height=32, width=16),
    "callback_on_step_end": lambda components: dict(callback_on_step_end=scale_latents_at_step(1)),
    "callback_tensor_inputs": lambda components: dict(callback_on_step_end=_scale_embeds, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"]),
    "legacy_callback": lambda components: dict(callback=lambda i, t, latents: latents.mul_(0.9), callback_steps=2),
    "output_type_latent": lambda components: dict(output_type="latent"),
    "return_dict": lambda components: dict(return_dict=False),
}


def _scale_embeds(pipe, i, t, tensors):
    """A callback that changes the prompt embeddings it is given (in CFG, [negative; prompt], as diffusers holds them)."""
    assert tensors["prompt_embeds"].shape[0] == 2 * tensors["negative_prompt_embeds"].shape[0]
    if i == 0:
        tensors["prompt_embeds"] = tensors["prompt_embeds"] * 1.5
    return tensors


def _images(output):
    return output[0] if isinstance(output, tuple) else output.images


@pytest.mark.parametrize("argument", list(ARGUMENTS))
def test_cfg_mode_gives_diffusers_image_with_each_argument(tiny_components, argument):
    args = dict(prompt=PROMPTS, num_inference_steps=4, output_type="np", guidance_scale=6.0) | ARGUMENTS[argument](tiny_components)
    ours = _images(_pipe(tiny_components)(mode="cfg", generator=torch.Generator().manual_seed(0), **args))
    theirs = _images(_diffusers(tiny_components)(generator=torch.Generator().manual_seed(0), **args))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)
    plain = _run(_pipe(tiny_components), guidance_scale=6.0, mode="cfg", output_type=args["output_type"])
    if argument not in ("return_dict", "output_type_latent"):  # the argument changed the image, so the equality tested it
        assert np.asarray(ours).shape != np.asarray(plain).shape or not np.allclose(np.asarray(ours), np.asarray(plain), atol=1e-4)


@pytest.mark.parametrize("argument", ["sigmas", "timesteps"])
def test_cfg_mode_gives_diffusers_image_with_custom_sigmas_or_timesteps(tiny_components, argument):
    components = tiny_components | {"scheduler": EulerDiscreteScheduler.from_config(tiny_components["scheduler"].config)}
    custom = {"sigmas": [14.6, 3.0, 1.0, 0.3], "timesteps": [999, 800, 400, 100]}[argument]
    args = dict(guidance_scale=6.0, num_inference_steps=None, **{argument: custom})
    np.testing.assert_allclose(_run(_pipe(components), mode="cfg", **args), _run(_diffusers(components), **args), atol=1e-5)


def test_cfg_mode_gives_diffusers_image_with_a_lora_scale(tiny_components):
    add_random_lora(tiny_components["unet"])
    half = dict(guidance_scale=6.0, cross_attention_kwargs={"scale": 0.5})
    ours = _run(_pipe(tiny_components), mode="cfg", **half)
    np.testing.assert_allclose(ours, _run(_diffusers(tiny_components), **half), atol=1e-5)
    assert not np.allclose(ours, _run(_pipe(tiny_components), mode="cfg", guidance_scale=6.0), atol=1e-4)


def test_cfg_mode_gives_diffusers_image_with_ip_adapter_embeds(tiny_components):
    add_random_ip_adapter(tiny_components["unet"])
    args = dict(guidance_scale=6.0, ip_adapter_image_embeds=image_embeds())
    ours = _run(_pipe(tiny_components, guide=False), mode="cfg", **args)
    np.testing.assert_allclose(ours, _run(_diffusers(tiny_components), **args), atol=1e-5)


def test_cfg_mode_gives_diffusers_image_with_diffusers_cfg_cutoff_callback(tiny_components):
    args = dict(prompt=PROMPTS[0], guidance_scale=6.0, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    ours = _run(_pipe(tiny_components), mode="cfg", **args)
    np.testing.assert_allclose(ours, _run(_diffusers(tiny_components), **args), atol=1e-5)
    assert not np.allclose(ours, _run(_pipe(tiny_components), mode="cfg", prompt=PROMPTS[0], guidance_scale=6.0), atol=1e-4)


def test_clip_skip_gives_diffusers_image_and_reaches_the_guide(sd15_dir):
    """(diffusers' own clip_skip reads text_encoder.text_model, which transformers 5 no longer has: the pipeline gives the
    shared text encoder an alias first, so diffusers' pipeline runs too once ours has.)"""
    sd = StableDiffusionPipeline.from_pretrained(sd15_dir)
    sd.set_progress_bar_config(disable=True)
    pipe = PlugAndPlayPipeline.from_pipe(sd, guide=randomised(OutputGuide.from_unet(sd.unet)))
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=["a cat"], guidance_scale=6.0, clip_skip=1)
    np.testing.assert_allclose(_run(pipe, mode="cfg", **args), _run(sd, **args), atol=1e-5)
    assert not np.allclose(_run(pipe, **args), _run(pipe, prompt=["a cat"], guidance_scale=6.0), atol=1e-4)


# -- diffusers' arguments in guide mode: each works, or is refused in one line saying why --------------------------

@pytest.mark.parametrize("argument", ["guidance_rescale", "eta", "num_images_per_prompt", "latents", "height_width", "callback_on_step_end",
                                      "legacy_callback"])
def test_guide_mode_applies_each_argument(tiny_components, argument):
    pipe = _pipe(tiny_components, trained=True)
    args = dict(guidance_scale=6.0) | ARGUMENTS[argument](tiny_components)
    with_it, without = _run(pipe, **args), _run(pipe, guidance_scale=6.0)
    assert with_it.shape != without.shape or not np.allclose(with_it, without, atol=1e-4)


def test_guide_mode_takes_prompt_embeddings_for_the_prompt(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    embeds, _ = _diffusers(tiny_components).encode_prompt(PROMPTS, "cpu", 1, False)
    np.testing.assert_array_equal(_run(pipe, prompt=None, prompt_embeds=embeds, guidance_scale=6.0), _run(pipe, guidance_scale=6.0))


def test_guide_mode_hands_callbacks_the_prompt_embeddings_alone(tiny_components):
    seen = []
    _run(_pipe(tiny_components, trained=True), guidance_scale=6.0, callback_on_step_end=lambda p, i, t, k: seen.append((i, t, k["prompt_embeds"].shape[0])) or k,
         callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert seen == [(i, t, 2) for i, t in enumerate(TIMESTEPS)]


def test_guide_mode_takes_a_lora_scale(tiny_components):
    add_random_lora(tiny_components["unet"])
    pipe = _pipe(tiny_components, trained=True)
    with pytest.warns(UserWarning, match=r"LoRA weights are active \(scale 1\) and their distance from the base is not measured"):
        full = _run(pipe, guidance_scale=6.0)
    with pytest.warns(UserWarning, match=r"\(scale 0.5\)"):
        half = _run(pipe, guidance_scale=6.0, cross_attention_kwargs={"scale": 0.5})
    assert not np.allclose(full, half, atol=1e-4)


def test_guide_mode_refuses_what_the_guide_cannot_honour_in_one_line(tiny_components):
    with pytest.raises(ValueError, match="guidance_rescale .* a residual guide never computes"):
        _run(_pipe(tiny_components, ResidualGuide), guidance_scale=6.0, guidance_rescale=0.5)
    add_random_ip_adapter(tiny_components["unet"])
    with pytest.raises(ValueError, match="guide mode cannot apply an IP-Adapter image: the guide was distilled on text prompts alone"):
        _run(_pipe(tiny_components), guidance_scale=6.0, ip_adapter_image_embeds=image_embeds())


def test_an_unknown_keyword_is_a_type_error_naming_it(tiny_components):
    with pytest.raises(TypeError, match="unexpected keyword argument.*guidance_interval"):
        _run(_pipe(tiny_components), guidance_interval=(0, 500))


# -- the guide in one UNet pass per step ---------------------------------------------------------------------------

@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_untrained_guide_gives_the_unguided_image(tiny_components, design):
    pipe = _pipe(tiny_components, design)
    np.testing.assert_array_equal(_run(pipe, guidance_scale=6.0), _run(pipe, guidance_scale=6.0, mode="none"))


@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_trained_guide_changes_the_image_in_one_unet_call_per_step_and_w_1_skips_it(tiny_components, design):
    pipe = _pipe(tiny_components, design, trained=True)
    batches = _unet_batches(pipe)
    guided = _run(pipe, guidance_scale=6.0)
    assert batches == [2] * 4  # 2 prompts, 4 steps, no doubled CFG batch
    unguided = _run(pipe, guidance_scale=6.0, mode="none")
    assert np.abs(guided - unguided).max() > 1e-3
    np.testing.assert_array_equal(_run(pipe, guidance_scale=1.0), unguided)
    np.testing.assert_array_equal(_run(pipe, guidance_scale=6.0), guided)  # the same generator, the same image


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler])
def test_any_diffusers_scheduler_works(tiny_components, scheduler_class):
    pipe = _pipe(tiny_components, trained=True)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    images = _run(pipe, guidance_scale=4.0)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_from_pipe_attaches_a_guide_to_a_loaded_sd_pipeline_quietly(tiny_components):
    sd = _diffusers(tiny_components)
    guide = OutputGuide.from_unet(sd.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = PlugAndPlayPipeline.from_pipe(sd, guide=guide)
    assert pipe.guide is guide and pipe.unet is sd.unet


def test_from_pipe_prints_no_cast_notices(tiny_components, capfd):
    PlugAndPlayPipeline.from_pipe(_diffusers(tiny_components), guide=OutputGuide.from_unet(tiny_components["unet"]))
    assert "should be kept in float32" not in capfd.readouterr().err


def test_save_and_load_with_guide(tiny_components, tmp_path):
    pipe = _pipe(tiny_components, trained=True)
    pipe.save_pretrained(tmp_path / "pnp")
    loaded = PlugAndPlayPipeline.from_pretrained(tmp_path / "pnp")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.guide) is OutputGuide
    np.testing.assert_allclose(_run(loaded, guidance_scale=5.0), _run(pipe, guidance_scale=5.0), atol=1e-6)


@pytest.mark.parametrize("bad, match", [(dict(num_inference_steps=0), "num_inference_steps must be >= 1"), (dict(mode="fast"), "mode must be one of"),
                                        (dict(policy="carry"), "policy must be a pnpguide.GuidancePolicy")])
def test_bad_arguments_are_clear_errors_before_the_prompt_is_encoded(tiny_components, bad, match):
    pipe = _pipe(tiny_components)
    encoded = []
    pipe.text_encoder.register_forward_hook(lambda *args: encoded.append(1))
    with pytest.raises(ValueError, match=match):
        _run(pipe, **bad)
    assert not encoded


def test_guide_mode_without_a_guide_is_a_clear_error(tiny_components):
    with pytest.raises(ValueError, match="needs a guide"):
        _run(_pipe(tiny_components, guide=False), guidance_scale=5.0, mode="guide")


def test_w_outside_the_trained_range_warns(tiny_components):
    pipe = _pipe(tiny_components)
    pipe.guide.register_to_config(trained_guidance_range=(2.0, 9.0))
    with pytest.warns(UserWarning, match="outside the range"):
        _run(pipe, guidance_scale=12.0)


def test_a_negative_prompt_is_read_by_a_negative_head_and_ignored_with_a_warning_by_other_guides(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    with pytest.warns(UserWarning, match="negative_prompt is ignored in guide mode"):
        np.testing.assert_array_equal(_run(pipe, guidance_scale=6.0, negative_prompt=["blue", "red"]), _run(pipe, guidance_scale=6.0))
    pipe.guide = randomised(pipe.guide.with_negative_head())
    plain = _run(pipe, guidance_scale=6.0)
    with_one = _run(pipe, guidance_scale=6.0, negative_prompt=["", "red"])
    np.testing.assert_array_equal(with_one[0], plain[0])  # the head is skipped on the row without a negative
    assert np.abs(with_one[1] - plain[1]).max() > 1e-3


# -- the policy: the guide's own by default, or the call's ---------------------------------------------------------

def _carry(full_steps=2):
    return CorrectionCarry(full_steps, [float(t) for t in TIMESTEPS], [1.0, 0.9, 0.8, 0.7])


def test_cfg_with_a_carry_runs_cfg_for_its_full_steps_then_one_pass_with_the_correction_carried(tiny_components):
    pipe = _pipe(tiny_components, guide=False)
    batches = _unet_batches(pipe)
    carried = _run(pipe, guidance_scale=6.0, policy=GuidancePolicy(carry=_carry()))
    assert batches == [4, 4, 2, 2]
    cfg, none = _run(pipe, guidance_scale=6.0), _run(pipe, guidance_scale=6.0, mode="none")
    assert np.abs(carried - cfg).mean() < np.abs(none - cfg).mean()  # closer to CFG than no guidance, at 6 passes of 8
    np.testing.assert_allclose(_run(pipe, guidance_scale=6.0, policy=GuidancePolicy(carry=_carry(4))), cfg, atol=1e-6)


def test_a_guide_folders_policy_is_applied_by_default_and_a_call_can_override_it(tiny_components, tmp_path):
    """The guide runs its first steps and its correction is carried after them: Python's default call and the saved folder
    agree, and `GuidancePolicy()` runs the guide at every step (with a warning: it learnt the first steps only)."""
    guide = randomised(OutputGuide.from_unet(tiny_components["unet"]))
    guide.register_to_config(trained_first_steps=2)
    guide.correction_carry = _carry()
    pipe = PlugAndPlayPipeline(**tiny_components, guide=guide)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.guide.register_forward_hook(lambda module, args, output: calls.append(1))
    by_default = _run(pipe, guidance_scale=6.0)
    assert len(calls) == 2
    np.testing.assert_array_equal(by_default, _run(pipe, guidance_scale=6.0, policy=GuidancePolicy(carry=_carry())))
    with pytest.warns(UserWarning, match="learnt the first 2 steps of sampling only"):
        every_step = _run(pipe, guidance_scale=6.0, policy=GuidancePolicy())
    assert len(calls) == 2 + 2 + 4 and np.abs(every_step - by_default).max() > 1e-3


def test_a_carry_is_read_at_another_step_counts_timesteps(tiny_components):
    carry = _carry()
    resampled = carry.resampled([999.0, 874.0, 749.0, 624.0, 499.0, 374.0, 249.0, 124.0])
    assert resampled.full_steps == 3  # every timestep at or above 749, the last one run in full
    assert resampled.factors[1] == pytest.approx(0.9 ** 0.5) and resampled.factors[1] * resampled.factors[2] == pytest.approx(0.9)
    pipe = _pipe(tiny_components, guide=False)
    batches = _unet_batches(pipe)
    _run(pipe, guidance_scale=6.0, num_inference_steps=8, policy=GuidancePolicy(carry=carry))
    assert batches == [4, 4, 4, 2, 2, 2, 2, 2]


def test_an_interval_guides_only_inside_it(tiny_components):
    pipe = _pipe(tiny_components, guide=False)
    batches = _unet_batches(pipe)
    inside = _run(pipe, guidance_scale=5.0, policy=GuidancePolicy(interval=(500, 1000)))
    assert batches == [4, 4, 2, 2]  # 2 prompts: [uncond; cond] at 999 and 749, the prompt alone at 499 and 249
    np.testing.assert_array_equal(_run(pipe, guidance_scale=5.0, policy=GuidancePolicy(interval=(0, 1000))), _run(pipe, guidance_scale=5.0))
    assert np.abs(inside - _run(pipe, guidance_scale=5.0)).max() > 1e-3


@pytest.mark.parametrize("bad, match", [(dict(interval=(600, 200)), r"0 <= t_low <= t_high <= 1000"), (dict(adaptive_threshold=2.0), "cosine in"),
                                        (dict(carry=[1.0]), "carry must be a pnpguide.CorrectionCarry"), (dict(timesteps=(999, 999)), "strictly descending")])
def test_a_bad_policy_is_a_one_line_error(bad, match):
    with pytest.raises(ValueError, match=match):
        GuidancePolicy(**bad)


def test_a_guides_interval_applies_without_a_negative_prompt_and_its_negative_policy_with_one(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    pipe.guide = pipe.guide.with_negative_head()
    pipe.guide.register_to_config(default_guidance_interval=(500, 1000))
    calls = []
    pipe.guide.register_forward_hook(lambda module, args, output: calls.append(int(torch.as_tensor(args[1]).flatten()[0])))
    _run(pipe, guidance_scale=5.0)
    assert calls == [999, 749]  # w = 1 below t = 500: the guide is skipped there
    calls.clear()
    _run(pipe, guidance_scale=5.0, negative_prompt=["red", "blue"])  # a negative needs every step
    assert calls == TIMESTEPS


def test_a_step_distilled_guide_samples_its_own_grid_whatever_the_scheduler(tiny_components):
    def distilled(components):
        pipe = _pipe(components, trained=True)
        ddim = {k: v for k, v in components["scheduler"].config.items() if not k.startswith("_")}
        pipe.guide.register_to_config(trained_timesteps=(999, 900, 500, 100), trained_schedule=ddim)
        return pipe

    calls = []
    pipe = distilled(tiny_components)
    pipe.guide.register_forward_hook(lambda module, args, output: calls.append(int(torch.as_tensor(args[1]).flatten()[0])))
    on_grid = _run(pipe, guidance_scale=5.0, num_inference_steps=None)  # the grid's step count by default
    assert calls == [999, 900, 500, 100]
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # init_noise_sigma != 1
    np.testing.assert_allclose(_run(pipe, guidance_scale=5.0, num_inference_steps=None), on_grid, atol=1e-5)
    with pytest.warns(UserWarning, match="step-distilled for 4 steps on its own grid; at 3 steps"):
        _run(pipe, guidance_scale=5.0, num_inference_steps=3)


def test_adaptive_guidance_stops_cfg_per_image_once_its_outputs_agree(tiny_components):
    pipe = _pipe(tiny_components, guide=False)
    batches = _unet_batches(pipe)
    never = _run(pipe, guidance_scale=6.0, policy=GuidancePolicy(adaptive_threshold=1.0))  # cosine never reaches 1: CFG throughout
    np.testing.assert_allclose(never, _run(pipe, guidance_scale=6.0), atol=1e-6)
    batches.clear()
    at_once = _run(pipe, guidance_scale=6.0, policy=GuidancePolicy(adaptive_threshold=-0.99))
    assert batches == [4, 2, 2, 2]  # CFG at the first step, then the conditional pass alone
    assert not np.allclose(at_once, never, atol=1e-4)
    batches.clear()
    carried = _run(pipe, guidance_scale=6.0, policy=GuidancePolicy(adaptive_threshold=-0.99, carry=_carry()))
    assert batches == [4, 2, 2, 2] and not np.allclose(carried, at_once, atol=1e-4)  # then its correction carried on


def test_adaptive_guidance_needs_cfg_mode(tiny_components):
    with pytest.raises(ValueError, match="adaptive_threshold compares CFG's two passes"):
        _run(_pipe(tiny_components), guidance_scale=6.0, policy=GuidancePolicy(adaptive_threshold=0.9))


def test_the_model_output_observer_sees_every_model_call(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    steps = []
    with pipe.model_output_observer(steps.append):
        _run(pipe, guidance_scale=6.0)
    assert [s.timestep for s in steps] == TIMESTEPS and all(s.kind == "guide" and s.conditional is not None for s in steps)
    _run(pipe, guidance_scale=6.0)
    assert len(steps) == 4  # only within the block
