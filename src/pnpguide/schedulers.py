"""Sampler names as users know them (`--scheduler dpm++-2m`), mapped to diffusers scheduler classes.

A scheduler is built with `.from_config(pipe.scheduler.config)`, as diffusers documents swapping one: the base's
noise schedule (betas, prediction type, timestep spacing) is kept and only the solver changes. The guide is a
model of the noise prediction at one step, so it works with any solver, like the UNet it corrects.
"""

from __future__ import annotations

import importlib

# name -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),  # two model calls per step
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm++-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm-singlestep": ("DPMSolverSinglestepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def check_scheduler_name(name: str) -> str:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    return name


def scheduler_from_name(name: str, config):
    """A new diffusers scheduler of the kind `name` names, from another scheduler's `config`."""
    class_name, overrides = SCHEDULERS[check_scheduler_name(name)]
    scheduler_class = getattr(importlib.import_module("diffusers"), class_name)
    return scheduler_class.from_config(config, **overrides)


def __getattr__(name: str):
    """`GridDDIMScheduler` is built on first use: it needs diffusers and torch, and importing this module for the
    sampler names (the CLI's flags) must stay light."""
    if name == "GridDDIMScheduler":
        globals()[name] = _grid_ddim_scheduler()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _grid_ddim_scheduler():
    import torch
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    class GridDDIMScheduler(DDIMScheduler):
        """DDIM on an explicit, possibly non-uniform, grid of timesteps: a step goes from each listed timestep to the
        next one, and from the last to the end of sampling (`final_alpha_cumprod`), the deterministic DDIM step of
        :func:`pnpguide.distill_steps.ddim_step` at eta = 0. A guide distilled on such a grid records it
        (`trained_timesteps`) with its DDIM config (`trained_schedule`); sample it with the pipeline's own call::

            pipe.scheduler = GridDDIMScheduler.from_config(guide.config.trained_schedule)
            pipe(prompts, timesteps=list(guide.config.trained_timesteps), ...)

        (diffusers' `retrieve_timesteps` hands `timesteps=` to :meth:`set_timesteps`). Given `num_inference_steps`
        instead, it is DDIMScheduler unchanged: its uniform grid, and steps of `num_train_timesteps // num_inference_steps`.
        """

        def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                          timesteps: list[int] | None = None) -> None:
            if (num_inference_steps is None) == (timesteps is None):
                raise ValueError("pass either num_inference_steps or timesteps (a descending list), not both or neither")
            if timesteps is None:
                super().set_timesteps(num_inference_steps, device)
                self.next_timesteps = None  # DDIM's own uniform stride
                return
            grid = check_timestep_grid(timesteps, self.config.num_train_timesteps)
            self.num_inference_steps = len(grid)
            self.timesteps = torch.tensor(grid, dtype=torch.int64, device=device)
            self.next_timesteps = dict(zip(grid, grid[1:] + [-1]))  # -1: the end of sampling

        def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, use_clipped_model_output: bool = False,
                 generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None, return_dict: bool = True):
            """DDIMScheduler.step, except that the step goes to the next timestep of the grid set by `timesteps=`."""
            next_timesteps = getattr(self, "next_timesteps", None)
            if next_timesteps is None:
                return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise, return_dict)
            timestep = int(timestep)
            if timestep not in next_timesteps:
                raise ValueError(f"timestep {timestep} is not on this scheduler's grid {list(next_timesteps)}")
            prev_timestep = next_timesteps[timestep]
            alpha_t = self.alphas_cumprod[timestep]
            alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
            beta_t = 1 - alpha_t
            kind = self.config.prediction_type
            if kind == "epsilon":
                x0, eps = (sample - beta_t**0.5 * model_output) / alpha_t**0.5, model_output
            elif kind == "sample":
                x0 = model_output
                eps = (sample - alpha_t**0.5 * x0) / beta_t**0.5
            elif kind == "v_prediction":
                x0, eps = alpha_t**0.5 * sample - beta_t**0.5 * model_output, alpha_t**0.5 * model_output + beta_t**0.5 * sample
            else:
                raise ValueError(f"prediction_type {kind!r} must be one of epsilon, sample or v_prediction")
            if self.config.thresholding:
                x0 = self._threshold_sample(x0)
            elif self.config.clip_sample:
                x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
            std = eta * self._get_variance(timestep, prev_timestep) ** 0.5
            if use_clipped_model_output:
                eps = (sample - alpha_t**0.5 * x0) / beta_t**0.5
            prev_sample = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
            if eta > 0:
                if variance_noise is not None and generator is not None:
                    raise ValueError("pass generator or variance_noise, not both")
                if variance_noise is None:
                    variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
                prev_sample = prev_sample + std * variance_noise
            if not return_dict:
                return prev_sample, x0
            return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    GridDDIMScheduler.__module__, GridDDIMScheduler.__qualname__ = __name__, "GridDDIMScheduler"
    return GridDDIMScheduler


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
