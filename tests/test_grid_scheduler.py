"""GridDDIMScheduler: DDIM on an explicit grid of timesteps, sampled through the pipeline's public `timesteps=`."""

import pytest
import torch
from diffusers import DDIMScheduler

from pnpguide.distill_steps import _alpha_sigma, ddim_step, predicted_x0
from pnpguide.grid_scheduler import GridDDIMScheduler


def _ddim(tiny_components) -> DDIMScheduler:
    return DDIMScheduler.from_config(tiny_components["scheduler"].config)


@pytest.mark.parametrize("given", ["timesteps", "num_inference_steps"])
def test_on_a_uniform_grid_it_is_ddim_exactly(tiny_components, given):
    ddim = _ddim(tiny_components)
    ddim.set_timesteps(8)
    grid = GridDDIMScheduler.from_config(ddim.config)
    grid.set_timesteps(timesteps=ddim.timesteps.tolist()) if given == "timesteps" else grid.set_timesteps(8)
    assert grid.timesteps.tolist() == ddim.timesteps.tolist() and grid.num_inference_steps == 8
    torch.manual_seed(0)
    x_ddim = x_grid = torch.randn(2, 4, 8, 8)
    for t in ddim.timesteps.tolist():
        output = torch.randn(2, 4, 8, 8)
        x_ddim = ddim.step(output, t, x_ddim).prev_sample
        x_grid = grid.step(output, t, x_grid).prev_sample
        assert torch.equal(x_ddim, x_grid)


def test_a_non_uniform_step_goes_to_the_next_listed_timestep_and_the_last_to_the_end(tiny_components):
    """By hand: v-prediction x0 = sqrt(a) x - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x, then x' = sqrt(a') x0 + sqrt(1 - a') eps."""
    grid = GridDDIMScheduler.from_config(_ddim(tiny_components).config)
    grid.set_timesteps(timesteps=[999, 937, 874, 499])
    acp = grid.alphas_cumprod.double()
    torch.manual_seed(0)
    x, v = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    for t, t_next in ((874, 499), (499, None)):
        a = acp[t]
        a_next = grid.final_alpha_cumprod.double() if t_next is None else acp[t_next]
        x0, eps = a.sqrt() * x - (1 - a).sqrt() * v, a.sqrt() * v + (1 - a).sqrt() * x
        expected = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        out = grid.step(v.float(), t, x.float())
        torch.testing.assert_close(out.prev_sample.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pred_original_sample.double(), x0, rtol=1e-5, atol=1e-5)


def test_its_step_is_distill_steps_ddim_step(tiny_components):
    """The sampler and the training's target arithmetic agree on a non-uniform grid (the end included)."""
    grid = GridDDIMScheduler.from_config(_ddim(tiny_components).config)
    timesteps = [999, 939, 759, 499, 259]
    grid.set_timesteps(timesteps=timesteps)
    acp, final = grid.alphas_cumprod.float(), float(grid.final_alpha_cumprod)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for t, t_next in zip(timesteps, timesteps[1:] + [-1]):
        v = torch.randn(2, 4, 8, 8)
        a, s = _alpha_sigma(acp, torch.tensor([t]), final)
        a_n, s_n = _alpha_sigma(acp, torch.tensor([t_next]), final)
        expected = ddim_step(predicted_x0(v, x, a, s, "v_prediction"), x, a, s, a_n, s_n)
        x = grid.step(v, t, x).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("timesteps", [[], [500, 500], [100, 500], [1000, 10], [10, -1]])
def test_a_grid_must_be_strictly_descending_within_the_range(tiny_components, timesteps):
    grid = GridDDIMScheduler.from_config(_ddim(tiny_components).config)
    with pytest.raises(ValueError, match="timesteps must"):
        grid.set_timesteps(timesteps=timesteps)


def test_a_timestep_off_the_grid_is_refused(tiny_components):
    grid = GridDDIMScheduler.from_config(_ddim(tiny_components).config)
    grid.set_timesteps(timesteps=[999, 499])
    with pytest.raises(ValueError, match="not on this scheduler's grid"):
        grid.step(torch.zeros(1, 4, 8, 8), 874, torch.zeros(1, 4, 8, 8))


def test_the_pipeline_samples_a_grid_through_its_public_call(tiny_components):
    """`pipe(..., timesteps=grid)` with the scheduler swapped in: the pipeline's images are DDIM along the grid, and on
    the uniform grid they are the DDIM pipeline's own."""
    from pnpguide import PlugAndPlayPipeline

    pipe = PlugAndPlayPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)

    def sample(**kwargs):
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", guidance_scale=1.0, **kwargs).images

    uniform = sample(num_inference_steps=4)
    pipe.scheduler = GridDDIMScheduler.from_config(pipe.scheduler.config)
    torch.testing.assert_close(sample(timesteps=[999, 749, 499, 249]), uniform, rtol=0, atol=0)

    timesteps = [999, 937, 874, 499]
    latents = sample(timesteps=timesteps)
    acp, final = pipe.scheduler.alphas_cumprod.float(), float(pipe.scheduler.final_alpha_cumprod)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    embeds, _ = pipe.encode_prompt(["a red circle"], "cpu", 1, False)
    with torch.no_grad():
        for t, t_next in zip(timesteps, timesteps[1:] + [-1]):
            v = pipe.unet(x, t, embeds).sample
            a, s = _alpha_sigma(acp, torch.tensor([t]), final)
            a_n, s_n = _alpha_sigma(acp, torch.tensor([t_next]), final)
            x = ddim_step(predicted_x0(v, x, a, s, "v_prediction"), x, a, s, a_n, s_n)
    torch.testing.assert_close(latents, x, rtol=1e-4, atol=1e-5)


def test_the_sampler_names_module_stays_light():
    """The CLI reads the sampler names from this module to build its flags: importing it must not import diffusers."""
    import subprocess
    import sys

    code = "import sys, pnpguide.schedulers as s; assert 'diffusers' not in sys.modules and 'torch' not in sys.modules, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers'))[:3]"
    subprocess.run([sys.executable, "-c", code], check=True)
