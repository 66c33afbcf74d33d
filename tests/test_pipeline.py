import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UniPCMultistepScheduler

from pnpguide.guide import GuideModel
from pnpguide.pipeline import PlugAndPlayPipeline

PROMPTS = ["a red circle on a black background", "a blue square above a green triangle on a white background"]


def _pipe(components, guide=True, trained=False):
    pipe = PlugAndPlayPipeline(**components, guide=GuideModel.from_unet(components["unet"], "tiny") if guide else None)
    if trained:  # stand-in for training: non-zero projections make the guide change the output
        torch.manual_seed(3)
        for p in pipe.guide.parameters():
            torch.nn.init.normal_(p, std=0.05)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    args = dict(prompt=PROMPTS, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0))
    return pipe(**(args | kwargs)).images


def test_cfg_mode_reproduces_stable_diffusion_pipeline(tiny_components):
    reference = StableDiffusionPipeline(**tiny_components)
    reference.set_progress_bar_config(disable=True)
    expected = _run(reference, guidance_scale=6.0)
    got = _run(_pipe(tiny_components), guidance_scale=6.0, mode="cfg")
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_untrained_guide_gives_the_unguided_image(tiny_components):
    pipe = _pipe(tiny_components)
    np.testing.assert_array_equal(_run(pipe, guidance_scale=6.0), _run(pipe, guidance_scale=6.0, mode="none"))


def test_trained_guide_changes_the_image_and_w_1_skips_it(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    guided, unguided = _run(pipe, guidance_scale=6.0), _run(pipe, guidance_scale=6.0, mode="none")
    assert np.abs(guided - unguided).max() > 1e-3
    np.testing.assert_array_equal(_run(pipe, guidance_scale=1.0), unguided)


def test_guide_mode_makes_one_unet_call_per_step(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    _run(pipe, guidance_scale=6.0)
    assert calls == [2] * 4  # batch of 2 prompts, 4 steps, no doubled CFG batch


def test_same_generator_same_image(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    np.testing.assert_array_equal(_run(pipe, guidance_scale=4.0), _run(pipe, guidance_scale=4.0))


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler])
def test_any_diffusers_scheduler_works(tiny_components, scheduler_class):
    pipe = _pipe(tiny_components, trained=True)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    images = _run(pipe, guidance_scale=4.0)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_from_pipe_attaches_a_guide_to_a_loaded_sd_pipeline(tiny_components):
    sd = StableDiffusionPipeline(**tiny_components)
    guide = GuideModel.from_unet(sd.unet, "tiny")
    pipe = PlugAndPlayPipeline.from_pipe(sd, guide=guide)
    assert pipe.guide is guide and pipe.unet is sd.unet


def test_save_and_load_with_guide(tiny_components, tmp_path):
    pipe = _pipe(tiny_components, trained=True)
    pipe.save_pretrained(tmp_path / "pnp")
    loaded = PlugAndPlayPipeline.from_pretrained(tmp_path / "pnp")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(loaded, guidance_scale=5.0), _run(pipe, guidance_scale=5.0), atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_scale=0.0), "guidance_scale must be a finite number"),
    (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
    (dict(mode="fast"), "mode must be one of"),
])
def test_bad_arguments_are_clear_errors(tiny_components, bad, match):
    with pytest.raises(ValueError, match=match):
        _run(_pipe(tiny_components), **bad)


def test_guide_mode_without_a_guide_is_a_clear_error(tiny_components):
    with pytest.raises(ValueError, match="needs a guide"):
        _run(_pipe(tiny_components, guide=False), guidance_scale=5.0, mode="guide")


def test_w_outside_the_trained_range_warns(tiny_components):
    pipe = _pipe(tiny_components)
    pipe.guide.register_to_config(trained_guidance_range=(2.0, 9.0))
    with pytest.warns(UserWarning, match="outside the range"):
        _run(pipe, guidance_scale=12.0)


def _step_distilled(components, steps=(4,)):
    pipe = _pipe(components, trained=True)
    ddim = {k: v for k, v in components["scheduler"].config.items() if not k.startswith("_")}
    pipe.guide.register_to_config(trained_step_counts=steps, trained_schedule=ddim)
    return pipe


def test_step_distilled_guide_samples_on_its_own_ddim_schedule_whatever_the_scheduler(tiny_components):
    on_ddim = _run(_step_distilled(tiny_components), guidance_scale=5.0)
    pipe = _step_distilled(tiny_components)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # init_noise_sigma != 1
    np.testing.assert_allclose(_run(pipe, guidance_scale=5.0), on_ddim, atol=1e-5)
    euler_cfg = _run(pipe, guidance_scale=5.0, mode="cfg", output_type="latent")  # other modes keep the user's scheduler
    ddim_cfg = _run(_step_distilled(tiny_components), guidance_scale=5.0, mode="cfg", output_type="latent")
    assert not torch.allclose(euler_cfg, ddim_cfg, atol=1e-3)


def test_step_distilled_guide_warns_at_other_step_counts(tiny_components):
    pipe = _step_distilled(tiny_components, steps=(4,))
    with pytest.warns(UserWarning, match=r"step-distilled for \[4\] DDIM steps, not 3"):
        _run(pipe, guidance_scale=5.0, num_inference_steps=3)


def test_evaluation_keeps_a_silenced_progress_bar_silent(tiny_components, capsys):
    from pnpguide.evaluation.sampling import as_plug_and_play, generate_images

    sd_pipe = StableDiffusionPipeline(**tiny_components)
    sd_pipe.set_progress_bar_config(disable=True)
    assert as_plug_and_play(sd_pipe)._progress_bar_config == {"disable": True}
    generate_images(sd_pipe, PROMPTS, 7.5, num_inference_steps=2, progress=False)
    assert "2/2" not in capsys.readouterr().err  # diffusers' per-call step bar


# guidance schedules: the tiny scheduler's 4 "trailing" steps are at timesteps 999, 749, 499, 249
@pytest.mark.parametrize("mode", ["guide", "cfg"])
def test_a_constant_list_gives_the_same_image_as_the_float(tiny_components, mode):
    pipe = _pipe(tiny_components, trained=True)
    np.testing.assert_array_equal(_run(pipe, guidance_scale=[5.0] * 4, mode=mode), _run(pipe, guidance_scale=5.0, mode=mode))


@pytest.mark.parametrize("mode", ["guide", "cfg"])
def test_an_interval_over_every_timestep_is_constant_w_and_over_none_is_no_guidance(tiny_components, mode):
    pipe = _pipe(tiny_components, trained=True)
    constant = _run(pipe, guidance_scale=5.0, mode=mode)
    np.testing.assert_array_equal(_run(pipe, guidance_scale=5.0, mode=mode, guidance_interval=(0, 1000)), constant)
    unguided = _run(pipe, guidance_scale=5.0, mode=mode, guidance_interval=(0, 100))
    np.testing.assert_array_equal(unguided, _run(pipe, mode="none"))
    assert np.abs(unguided - constant).max() > 1e-3  # so the two equalities above are not the same image twice


def test_a_guide_samples_with_its_default_interval_unless_the_call_gives_one(tiny_components):
    """The step-distilled guides record where their guidance pays (stop 31); cfg mode and an explicit interval ignore it."""
    pipe = _pipe(tiny_components, trained=True)
    inside, every_step = _run(pipe, guidance_scale=5.0, guidance_interval=(500, 1000)), _run(pipe, guidance_scale=5.0)
    cfg = _run(pipe, guidance_scale=5.0, mode="cfg")
    pipe.guide.register_to_config(default_guidance_interval=(500, 1000))
    calls = []
    hook = pipe.guide.register_forward_hook(lambda module, args, output: calls.append(int(torch.as_tensor(args[1]).flatten()[0])))
    np.testing.assert_array_equal(_run(pipe, guidance_scale=5.0), inside)
    assert calls == [999, 749]  # w = 1 below t = 500: the guide is skipped there
    hook.remove()
    np.testing.assert_array_equal(_run(pipe, guidance_scale=5.0, guidance_interval=(0, 1000)), every_step)
    np.testing.assert_array_equal(_run(pipe, guidance_scale=5.0, mode="cfg"), cfg)
    assert np.abs(inside - every_step).max() > 1e-3
    calls.clear()
    pipe.guide.register_forward_hook(lambda module, args, output: calls.append(1))
    _run(pipe, guidance_scale=5.0, negative_prompt=["red", "blue"])  # a negative needs every step (this guide ignores it, with a warning)
    assert len(calls) == 4


def test_cfg_steps_outside_the_interval_run_the_unet_once_at_batch_b(tiny_components):
    pipe = _pipe(tiny_components)
    batches = []
    pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    _run(pipe, guidance_scale=5.0, mode="cfg", guidance_interval=(500, 1000))
    assert batches == [4, 4, 2, 2]  # 2 prompts: [uncond; cond] at 999 and 749, the prompt alone at 499 and 249


def test_guide_steps_at_w_1_skip_the_guide(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    calls = []
    pipe.guide.register_forward_hook(lambda module, args, output: calls.append(args[3]))
    _run(pipe, guidance_scale=[6.0, 1.0, 4.0, 1.0])
    assert calls == [6.0, 4.0]


@pytest.mark.parametrize("mode", ["guide", "cfg"])
def test_a_callable_sees_step_index_and_timestep_and_equals_its_list(tiny_components, mode):
    pipe = _pipe(tiny_components, trained=True)
    seen = []
    by_callable = _run(pipe, guidance_scale=lambda i, t: seen.append((i, t)) or 2.0 + i, mode=mode)
    assert seen == list(enumerate(pipe.scheduler.timesteps.tolist())) and [t for _, t in seen] == [999, 749, 499, 249]
    np.testing.assert_array_equal(by_callable, _run(pipe, guidance_scale=[2.0, 3.0, 4.0, 5.0], mode=mode))


@pytest.mark.parametrize("bad, match", [
    (dict(guidance_scale=[5.0] * 3), "guidance_scale has 3 values but sampling takes 4 steps"),
    (dict(guidance_scale=[5.0, 0.5, 5.0, 5.0]), r"guidance_scale\[1\] is 0.5"),
    (dict(guidance_scale=[5.0, float("nan"), 5.0, 5.0]), r"guidance_scale\[1\] is nan"),
    (dict(guidance_scale=lambda i, t: float("nan")), r"returned nan at step 0 \(timestep 999\)"),
    (dict(guidance_scale=lambda i, t: 0.5 if i == 3 else 5.0), r"returned 0.5 at step 3 \(timestep 249\)"),
    (dict(guidance_interval=(600, 200)), r"0 <= t_low <= t_high <= 1000"),
    (dict(guidance_interval=(0, 1001)), r"0 <= t_low <= t_high <= 1000"),
])
@pytest.mark.parametrize("mode", ["guide", "cfg"])
def test_bad_schedules_fail_before_the_prompt_is_encoded(tiny_components, bad, match, mode):
    pipe = _pipe(tiny_components)
    encoded = []
    pipe.text_encoder.register_forward_hook(lambda *args: encoded.append(1))
    with pytest.raises(ValueError, match=match):
        _run(pipe, **(dict(guidance_scale=5.0, mode=mode) | bad))
    assert not encoded


def test_the_trained_range_warning_reads_the_schedule_not_a_constant(tiny_components, recwarn):
    pipe = _pipe(tiny_components)
    pipe.guide.register_to_config(trained_guidance_range=(2.0, 9.0))
    with pytest.warns(UserWarning, match="guidance_scale=12.0 is outside the range"):
        _run(pipe, guidance_scale=[5.0, 12.0, 5.0, 5.0])
    recwarn.clear()
    _run(pipe, guidance_scale=12.0, guidance_interval=(0, 100))  # no step is guided at 12
    assert not [w for w in recwarn if "outside the range" in str(w.message)]


def test_cfg_first_steps_run_cfg_then_the_guide_with_the_negative_prompt_in_the_cfg_steps(tiny_components, recwarn):
    pipe = _pipe(tiny_components, trained=True)
    calls = []  # (UNet batch, whether the guide's residuals came in) per model call
    pipe.unet.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args[0].shape[0], kwargs.get("down_block_additional_residuals") is not None)),
        with_kwargs=True,
    )
    negative = ["a blue square"] * len(PROMPTS)
    outputs = {}

    def record(name):
        return lambda t, x, out, *rest: outputs.setdefault(name, []).append(out)

    hybrid = _run(pipe, guidance_scale=6.0, cfg_first_steps=2, negative_prompt=negative, on_model_output=record("hybrid"))
    assert calls == [(4, False), (4, False), (2, True), (2, True)]  # [negative; prompt] twice, then one guided pass
    cfg = _run(pipe, guidance_scale=6.0, mode="cfg", negative_prompt=negative, on_model_output=record("cfg"))
    for step in (0, 1):  # CFG's own steps, its negative prompt included
        torch.testing.assert_close(outputs["hybrid"][step], outputs["cfg"][step])
    assert not torch.allclose(outputs["hybrid"][2], outputs["cfg"][2], atol=1e-4)  # then the guide
    assert not np.allclose(hybrid, cfg, atol=1e-3) and not np.allclose(hybrid, _run(pipe, guidance_scale=6.0), atol=1e-3)
    assert not np.allclose(hybrid, _run(pipe, guidance_scale=6.0, cfg_first_steps=2), atol=1e-3)  # the negative mattered
    assert "ignored after the first 2 (CFG) steps" in str(recwarn.pop(UserWarning).message)
    np.testing.assert_allclose(_run(pipe, guidance_scale=6.0, cfg_first_steps=4, negative_prompt=negative), cfg, atol=1e-6)
    np.testing.assert_array_equal(_run(pipe, guidance_scale=6.0, cfg_first_steps=0), _run(pipe, guidance_scale=6.0))


def test_cfg_first_steps_count_a_timestep_the_scheduler_visits_twice_as_one_step(tiny_components):
    from pnpguide.pipeline import step_modes

    pndm = [667, 334, 334, 1]
    assert step_modes("guide", pndm, [5.0] * 4, cfg_first_steps=2) == ["cfg", "cfg", "cfg", "guide"]
    assert step_modes("guide", pndm, [5.0, 5.0, 5.0, 1.0], cfg_first_steps=1) == ["cfg", "guide", "guide", "none"]
    assert step_modes("cfg", pndm, [5.0] * 4, cfg_first_steps=0) == ["cfg"] * 4


@pytest.mark.parametrize("bad, match", [
    (-1, "cfg_first_steps must be a whole number >= 0"), (1.5, "whole number"), (5, "cfg_first_steps=5 is more than the 4 sampling steps"),
])
def test_bad_cfg_first_steps_fail_before_the_prompt_is_encoded(tiny_components, bad, match):
    pipe = _pipe(tiny_components)
    encoded = []
    pipe.text_encoder.register_forward_hook(lambda *args: encoded.append(1))
    with pytest.raises(ValueError, match=match):
        _run(pipe, guidance_scale=5.0, cfg_first_steps=bad)
    assert not encoded
