"""CorrectionCarry: CFG in full for the first steps, then one UNet pass with CFG's last correction carried on."""

import warnings

import numpy as np
import pytest
import torch

from conftest import randomised
from pnpguide import CorrectionCarry, GuidancePolicy, OutputGuide, PlugAndPlayPipeline, ResidualGuide

PROMPTS = ["a red circle on a black background", "a blue square above a green triangle on a white background"]


def _pipe(components, design=None):
    """A pipeline with no guide, or with a guide of `design` whose random weights stand in for training."""
    guide = randomised(design.from_unet(components["unet"])) if design is not None else None
    pipe = PlugAndPlayPipeline(**components, guide=guide)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    args = dict(prompt=PROMPTS, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0))
    return pipe(**(args | kwargs)).images


def _carry(pipe, full_steps=2, steps=4):
    return CorrectionCarry.fit(pipe, ["a red circle", "a blue square", "a green triangle"], full_steps=full_steps,
                               num_inference_steps=steps, batch_size=2)


def _observed(step):
    """(t, model input, the output stepped with, prompt embeddings) of one observed model call."""
    return step.timestep, step.model_input, step.output, step.branches.prompt_embeds


def _record(pipe, **kwargs):
    outputs, batches = [], []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    with pipe.model_output_observer(lambda step: outputs.append(_observed(step))):
        image = _run(pipe, **(dict(guidance_scale=5.0, mode="cfg") | kwargs))
    hook.remove()
    return image, outputs, batches


def test_the_fit_finds_the_factor_that_carries_each_correction_to_the_next(tiny_components):
    pipe = _pipe(tiny_components)
    carry = CorrectionCarry.fit(pipe, ["a red circle", "a blue square"], full_steps=2, num_inference_steps=4)
    corrections = []

    def record(step):
        t, x, out, embeds = _observed(step)
        with torch.no_grad():
            corrections.append((out - pipe.unet(x, t, encoder_hidden_states=embeds).sample) / 4.0)

    with pipe.model_output_observer(record):
        pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=5.0, mode="cfg", output_type="latent",
             generator=torch.Generator().manual_seed(0))
    expected = [(a * b).sum() / b.pow(2).sum() for a, b in zip(corrections[1:], corrections)]
    assert carry.timesteps == [float(t) for t in pipe.scheduler.timesteps] and carry.factors[0] == 1.0
    np.testing.assert_allclose(carry.factors[1:], [e.item() for e in expected], rtol=1e-4)
    assert not np.allclose(carry.factors[1:], 1.0, atol=1e-2)


def test_after_the_full_steps_each_step_is_one_unet_pass_with_the_carried_correction(tiny_components):
    pipe = _pipe(tiny_components)
    carry = _carry(pipe, full_steps=2)
    image, outputs, batches = _record(pipe, policy=GuidancePolicy(carry=carry))
    assert batches == [4, 4, 2, 2]  # CFG's 2B call for two steps, then B
    _, cfg_outputs, _ = _record(pipe)
    for (t, x, out, e), (_, _, cfg_out, _) in zip(outputs[:2], cfg_outputs[:2]):
        torch.testing.assert_close(out, cfg_out)
    with torch.no_grad():
        cond = [pipe.unet(x, t, encoder_hidden_states=e).sample for t, x, out, e in outputs]
    correction = (outputs[1][2] - cond[1]) / 4.0
    for k in (2, 3):
        correction = correction * carry.factors[k]
        torch.testing.assert_close(outputs[k][2], cond[k] + 4.0 * correction)
    assert not np.allclose(image, _run(pipe, guidance_scale=5.0, mode="cfg"), atol=1e-4)  # not CFG after the full steps
    assert not np.allclose(image, _run(pipe, guidance_scale=5.0, mode="none"), atol=1e-4)


def test_carrying_with_every_step_in_full_is_cfg(tiny_components):
    pipe = _pipe(tiny_components)
    np.testing.assert_allclose(_run(pipe, guidance_scale=5.0, mode="cfg", policy=GuidancePolicy(carry=_carry(pipe, full_steps=4))),
                               _run(pipe, guidance_scale=5.0, mode="cfg"), atol=1e-6)


def test_the_negative_prompts_correction_is_what_is_carried(tiny_components):
    pipe = _pipe(tiny_components)
    policy = GuidancePolicy(carry=_carry(pipe, full_steps=1))
    negative = ["a dog"] * len(PROMPTS)
    with_negative = _run(pipe, guidance_scale=5.0, mode="cfg", policy=policy, negative_prompt=negative, output_type="latent")
    without = _run(pipe, guidance_scale=5.0, mode="cfg", policy=policy, output_type="latent")
    assert not torch.allclose(with_negative, without, atol=1e-4)


def test_save_and_load_round_trip(tiny_components, tmp_path):
    pipe = _pipe(tiny_components)
    carry = _carry(pipe)
    assert CorrectionCarry.load(carry.save(tmp_path / "carry.json")) == carry
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a saved CorrectionCarry"):
        CorrectionCarry.load(tmp_path / "bad.json")


def test_a_carry_fitted_for_other_steps_is_read_at_this_calls_timesteps(tiny_components):
    """Fitted at 4 steps (t = 999 and 749 in full), sampled at 6: the steps at or above t = 749 run CFG in full (999 and
    832), and the correction is carried on with the fitted factors read at the 6 steps' timesteps."""
    pipe = _pipe(tiny_components)
    carry = _carry(pipe, full_steps=2)
    _, outputs, batches = _record(pipe, policy=GuidancePolicy(carry=carry), num_inference_steps=6)
    timesteps = [float(t) for t, *_ in outputs]
    assert timesteps == [999.0, 832.0, 666.0, 499.0, 332.0, 166.0]
    assert batches == [4, 4, 2, 2, 2, 2]
    resampled = carry.resampled(timesteps)
    assert resampled.full_steps == 2 and resampled.timesteps == timesteps and len(resampled.factors) == 6
    assert carry.resampled(carry.timesteps) is carry
    with torch.no_grad():
        cond = [pipe.unet(x, t, encoder_hidden_states=e).sample for t, x, out, e in outputs]
    correction = (outputs[1][2] - cond[1]) / 4.0
    for k in range(2, 6):
        correction = correction * resampled.factors[k]
        torch.testing.assert_close(outputs[k][2], cond[k] + 4.0 * correction)


@pytest.mark.parametrize("call, match", [
    (dict(mode="guide"), "a carry in guide mode carries an output guide's correction on, and this is a residual guide: use an output guide"),
    (dict(policy="carry.json"), "policy must be a pnpguide.GuidancePolicy"),
])
def test_a_carry_for_another_mode_is_a_one_line_error_before_the_prompt_is_encoded(tiny_components, call, match):
    pipe = _pipe(tiny_components, ResidualGuide)
    carry = _carry(pipe)
    encoded = []
    pipe.text_encoder.register_forward_hook(lambda *args: encoded.append(1))
    with pytest.raises(ValueError, match=match):
        _run(pipe, **(dict(guidance_scale=5.0, mode="cfg", policy=GuidancePolicy(carry=carry)) | call))
    assert not encoded


def test_a_policy_takes_only_a_correction_carry():
    with pytest.raises(ValueError, match="carry must be a pnpguide.CorrectionCarry"):
        GuidancePolicy(carry="carry.json")


@pytest.mark.parametrize("kwargs, match", [
    (dict(full_steps=0), "full_steps must be a whole number >= 1"),
    (dict(prompts="a red circle"), "needs a non-empty list of prompts"),
    (dict(guidance_scale=1.0), "needs guidance_scale != 1"),
])
def test_bad_fit_arguments_are_one_line_errors(tiny_components, kwargs, match):
    pipe = _pipe(tiny_components)
    with pytest.raises(ValueError, match=match):
        CorrectionCarry.fit(pipe, **(dict(prompts=["a red circle"], num_inference_steps=2) | kwargs))


def test_a_carry_at_guidance_scale_1_is_the_unguided_model(tiny_components):
    pipe = _pipe(tiny_components)
    np.testing.assert_allclose(_run(pipe, guidance_scale=1.0, mode="cfg", policy=GuidancePolicy(carry=_carry(pipe))),
                               _run(pipe, guidance_scale=1.0, mode="none"), atol=1e-6)


def _output_guide_pipe(components, trained_first_steps=None):
    """A pipeline with an output guide whose weights stand in for training (non-zero: it changes the output)."""
    pipe = _pipe(components, OutputGuide)
    pipe.guide.register_to_config(trained_first_steps=trained_first_steps)
    return pipe


def test_in_guide_mode_an_output_guides_correction_is_carried_after_its_full_steps(tiny_components):
    pipe = _output_guide_pipe(tiny_components)
    carry = _carry(pipe, full_steps=2)
    outputs, batches, branches = [], [], []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    calls = []
    guide_hook = pipe.guide.register_forward_hook(lambda *args: calls.append(1))
    with pipe.model_output_observer(lambda step: (outputs.append(_observed(step)), branches.append(step.branches))):
        image = _run(pipe, guidance_scale=5.0, mode="guide", policy=GuidancePolicy(carry=carry))
    hook.remove(), guide_hook.remove()
    assert batches == [2, 2, 2, 2] and len(calls) == 2  # one UNet pass per step, the guide at the first two only
    with torch.no_grad():
        cond = [pipe.unet(x, t, encoder_hidden_states=e).sample for t, x, out, e in outputs]
        guided = [pipe.model_output("guide", x, t, branches[k], 5.0)[0] for k, (t, x, out, e) in enumerate(outputs[:2])]
    for k in (0, 1):
        torch.testing.assert_close(outputs[k][2], guided[k])
    correction = (outputs[1][2] - cond[1]) / 4.0
    for k in (2, 3):
        correction = correction * carry.factors[k]
        torch.testing.assert_close(outputs[k][2], cond[k] + 4.0 * correction)
    assert not np.allclose(image, _run(pipe, guidance_scale=5.0, mode="guide"), atol=1e-4)  # not the guide at every step


def test_a_guide_distilled_on_the_first_steps_warns_without_a_carry_for_them(tiny_components):
    pipe = _output_guide_pipe(tiny_components, trained_first_steps=2)
    with pytest.warns(UserWarning, match="learnt the first 2 steps of sampling only, and this call's policy has no carry"):
        _run(pipe, guidance_scale=5.0, mode="guide")  # its folder gave it no carry: its own policy has none
    with pytest.warns(UserWarning, match="first 2 steps"):
        _run(pipe, guidance_scale=5.0, mode="guide", policy=GuidancePolicy())
    carry = _carry(pipe, full_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(pipe, guidance_scale=5.0, mode="guide", policy=GuidancePolicy(carry=carry))
        pipe.guide.correction_carry = carry  # as a guide folder holds it: its own policy carries it
        _run(pipe, guidance_scale=5.0, mode="guide")
