"""DDIM on a step-distilled guide's own grid of timesteps."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput


class GridDDIMScheduler(DDIMScheduler):
    """Deterministic DDIM on any descending grid of timesteps: each step goes to the next timestep of the grid, the last
    one to the end of sampling. A step-distilled guide learnt one such grid (denser where the trajectory bends); the
    pipeline samples it with this scheduler. On a uniform grid it is DDIMScheduler with eta = 0."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        if timesteps is None:
            super().set_timesteps(num_inference_steps, device)
            timesteps = self.timesteps.tolist()
        steps = check_timestep_grid(timesteps, self.config.num_train_timesteps)
        self.num_inference_steps = len(steps)
        self.timesteps = torch.tensor(steps, dtype=torch.int64, device=device)
        self._next_timestep = dict(zip(steps, steps[1:] + [-1]))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        if eta != 0:
            raise ValueError(f"GridDDIMScheduler samples deterministic DDIM (eta = 0), got eta={eta}")
        t = int(timestep)
        if t not in self._next_timestep:
            raise ValueError(f"timestep {t} is not on this scheduler's grid {list(self._next_timestep)}: call set_timesteps first")
        t_next = self._next_timestep[t]
        alpha = self.alphas_cumprod[t].to(sample.device)
        alpha_next = self.alphas_cumprod[t_next].to(sample.device) if t_next >= 0 else self.final_alpha_cumprod.to(sample.device)
        x0, eps = prediction_to_x0_eps(model_output, sample, alpha, self.config.prediction_type)
        prev = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev,)


def prediction_to_x0_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha_cumprod: torch.Tensor, prediction_type: str):
    """(x0, noise) implied by a model output of this prediction type at a state with cumulative alpha `alpha_cumprod`."""
    a, s = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
    if prediction_type == "epsilon":
        return (sample - s * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * sample - s * model_output, a * model_output + s * sample
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / s
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use epsilon, v_prediction or sample")


def check_timestep_grid(timesteps, num_train_timesteps: int) -> list[int]:
    """A grid as a list of ints: at least one timestep, strictly descending, each in [0, num_train_timesteps)."""
    grid = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
    if not grid:
        raise ValueError("timesteps must list at least one timestep")
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {grid}")
    if grid[0] >= num_train_timesteps or grid[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {grid}")
    return grid
