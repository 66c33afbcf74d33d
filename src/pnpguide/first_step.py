"""The unconditional pass at the first, pure-noise sampling step, as an affine map of the model input.

CFG's correction (w - 1) * (cond - uncond) is largest by far at the first step, and that step sets the image's
layout: CFG there and no guidance after closes about a third of the image gap to CFG on the embedded model, as much
as a trained guide over every step (docs/guides.md, "Stop 21"). At that step x_t is almost pure noise, so the
unconditional prediction is almost an affine function of it: noise in, noise out, plus the data's mean. A least
squares fit on a few dozen pure-noise inputs (no prompts, no training) reproduces 97% of that step's CFG gap on the
embedded model, and it makes the first step CFG for the cost of one UNet pass. The fit belongs to a model, a size
and a first timestep: refit it for a fine-tune, after loading LoRA weights, or for another size or step count.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

FIT_SAMPLES = 64  # pure-noise inputs the fit is made from: 64 x 4 channels x every position, far more rows than unknowns


@dataclass
class FirstStepFit:
    """uncond(x) ~ weight @ x + bias, per position: a 1x1 channel mix shared by all positions, and a bias map.

    weight: (C, C); bias: (C, h, w), for model inputs of shape (B, C, h, w) at `timestep`."""

    timestep: float
    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    @torch.no_grad()
    def fit(cls, pipe, height: int | None = None, width: int | None = None, num_inference_steps: int = 25,
            num_samples: int = FIT_SAMPLES, batch_size: int = 16, seed: int = 0) -> "FirstStepFit":
        """Fit the unconditional pass of `pipe` (a PlugAndPlayPipeline, its scheduler as it will sample) at the first
        of `num_inference_steps` steps, at this image size; `num_samples` UNet passes at batch `batch_size`."""
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to fit the unconditional pass, got {num_samples}")
        height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
        width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
        # the scheduler guide mode will sample with (a step-distilled guide's own DDIM schedule at its step counts);
        # copied: set_timesteps and scale_model_input keep state, and the pipeline's stays as it was
        scheduler = copy.deepcopy(pipe.sampling_scheduler(num_inference_steps, "guide") if pipe.guide is not None else pipe.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=pipe.device)
        timestep = scheduler.timesteps[0]
        empty, empty_added = pipe.unconditional_inputs(height, width)
        shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        generator = torch.Generator().manual_seed(seed)
        inputs, outputs = [], []
        for start in range(0, num_samples, batch_size):
            rows = min(batch_size, num_samples - start)
            noise = torch.randn((rows, *shape), generator=generator).to(pipe.device, pipe.unet.dtype) * scheduler.init_noise_sigma
            model_input = scheduler.scale_model_input(noise, timestep)
            added = None if empty_added is None else {k: v.expand(rows, -1) for k, v in empty_added.items()}
            outputs.append(pipe.mode_noise_pred("none", model_input, timestep, empty.expand(rows, -1, -1), None, 1.0, added).float())
            inputs.append(model_input.float())
        return cls.from_samples(float(timestep), torch.cat(inputs), torch.cat(outputs))

    @classmethod
    def from_samples(cls, timestep: float, inputs: torch.Tensor, outputs: torch.Tensor) -> "FirstStepFit":
        """Least squares with a bias per position (fixed effects): centre both sides on their mean over samples,
        solve for the channel mix, and the bias is what the mix leaves of the mean."""
        channels = inputs.shape[1]
        x_mean, y_mean = inputs.mean(0), outputs.mean(0)
        x = (inputs - x_mean).permute(0, 2, 3, 1).reshape(-1, channels)
        y = (outputs - y_mean).permute(0, 2, 3, 1).reshape(-1, outputs.shape[1])
        weight = torch.linalg.lstsq(x.cpu(), y.cpu()).solution.T.to(inputs.device)  # (C_out, C_in)
        bias = y_mean - torch.einsum("oc,chw->ohw", weight, x_mean)
        return cls(timestep, weight, bias)

    def __call__(self, model_input: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.weight.to(model_input), model_input) + self.bias.to(model_input)

    def check_timestep(self, timestep: float) -> None:
        """One line naming both timesteps when the fit was made for another first step (scheduler or step count)."""
        if float(timestep) != self.timestep:
            raise ValueError(f"first_step_fit was made for a first timestep of {self.timestep:g}, but sampling starts at "
                             f"{float(timestep):g}: fit it again with this num_inference_steps and scheduler")

    def check_size(self, model_input: torch.Tensor) -> None:
        """One line naming both latent shapes when the fit was made at another image size."""
        if tuple(model_input.shape[1:]) != (self.weight.shape[1], *self.bias.shape[1:]):
            raise ValueError(f"first_step_fit was made for latents of {tuple(self.bias.shape)}, not {tuple(model_input.shape[1:])}: "
                             "fit it again at this height and width")
