"""FirstStepFit: the unconditional pass at the first step as an affine map of the model input."""

import pytest
import torch

from pnpguide import FirstStepFit
from pnpguide.teacher import cfg_combine
from test_pipeline import _pipe, _run, _step_distilled


def test_the_fit_recovers_an_affine_map_with_a_bias_per_position():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 4, generator=generator), torch.randn(4, 8, 8, generator=generator)
    inputs = torch.randn(32, 4, 8, 8, generator=generator)
    outputs = torch.einsum("oc,bchw->bohw", weight, inputs) + bias
    fit = FirstStepFit.from_samples(999.0, inputs, outputs)
    torch.testing.assert_close(fit.weight, weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fit.bias, bias, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fit(inputs[:3]), outputs[:3], atol=1e-4, rtol=1e-4)


def test_fitting_leaves_the_pipelines_scheduler_as_it_was_and_fits_its_first_timestep(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    before = _run(pipe, guidance_scale=5.0)
    fit = FirstStepFit.fit(pipe, num_inference_steps=4, num_samples=8, batch_size=3)
    assert fit.timestep == 999 and fit.bias.shape == (4, 8, 8) and fit.weight.shape == (4, 4)
    torch.testing.assert_close(torch.as_tensor(_run(pipe, guidance_scale=5.0)), torch.as_tensor(before))


def test_the_first_step_is_cfg_with_the_fitted_unconditional_pass_in_one_unet_call(tiny_components):
    pipe = _pipe(tiny_components, trained=True)
    fit = FirstStepFit.fit(pipe, num_inference_steps=4, num_samples=8)
    batches, steps = [], []
    pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    with_fit = _run(pipe, guidance_scale=5.0, first_step_fit=fit, on_model_output=lambda t, x, out, e, *rest: steps.append((t, x, out, e)))
    assert batches == [2] * 4  # one UNet pass per step, the first one included
    t, x, out, embeds = steps[0]
    with torch.no_grad():
        cond = pipe.unet(x, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(out, cfg_combine(fit(x), cond, 5.0))
    assert not torch.allclose(torch.as_tensor(with_fit), torch.as_tensor(_run(pipe, guidance_scale=5.0)), atol=1e-3)


@pytest.mark.parametrize("call, match", [
    (dict(height=32, width=32), r"made for latents of \(4, 8, 8\), not \(4, 16, 16\)"),
    (dict(negative_prompt=["red"] * 2), "cannot apply a negative prompt: use cfg_first_steps=1"),
    (dict(mode="cfg"), "use it with mode='guide' and cfg_first_steps=0"),
    (dict(cfg_first_steps=1), "use it with mode='guide' and cfg_first_steps=0"),
])
def test_a_fit_for_another_step_count_size_or_mode_is_a_one_line_error(tiny_components, call, match):
    pipe = _pipe(tiny_components, trained=True)
    fit = FirstStepFit.fit(pipe, num_inference_steps=4, num_samples=4)
    with pytest.raises(ValueError, match=match):
        _run(pipe, **(dict(guidance_scale=5.0, first_step_fit=fit) | call))


def test_a_fit_for_another_first_timestep_is_a_one_line_error_before_the_prompt_is_encoded(tiny_components):
    from diffusers import DDIMScheduler

    pipe = _pipe(tiny_components, trained=True)
    fit = FirstStepFit.fit(pipe, num_inference_steps=4, num_samples=4)  # trailing spacing: t = 999 at any step count
    _run(pipe, guidance_scale=5.0, first_step_fit=fit, num_inference_steps=10)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")  # starts at 750 for 4 steps
    encoded = []
    pipe.text_encoder.register_forward_hook(lambda *args: encoded.append(1))
    with pytest.raises(ValueError, match="made for a first timestep of 999, but sampling starts at 750: fit it again"):
        _run(pipe, guidance_scale=5.0, first_step_fit=fit)
    assert not encoded


def test_a_step_distilled_guide_is_fitted_on_its_own_schedule(tiny_components):
    from diffusers import DDIMScheduler

    pipe = _step_distilled(tiny_components, steps=(4,))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")  # not the guide's
    fit = FirstStepFit.fit(pipe, num_inference_steps=4, num_samples=4)
    assert fit.timestep == 999  # the guide's own trailing schedule, which the pipeline samples it on
    with pytest.warns(UserWarning, match="first_step_fit with a step-distilled guide"):
        _run(pipe, guidance_scale=5.0, first_step_fit=fit)
