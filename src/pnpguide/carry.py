"""CFG's correction carried from step to step: CFG in full for the first steps, then one UNet pass per step.

CFG's output is `cond + (w - 1) * d` with `d = cond - uncond`. On the embedded model, from the fifth of 25 steps on,
`d` at a step is 0.94-0.99 cosine-similar to `d` at the step before, and a single factor per step, `d_k ~ a_k d_{k-1}`,
predicts 0.89-0.99 of it; at the first steps it is not (0.31 at the second), because that is where the layout is
decided (docs/findings.md). So sampling can run CFG's two passes for the first few steps and afterwards only
the conditional pass, with the last correction carried by the fitted factors: with 5 of 25 steps in full, 0.88-0.93
of the image gap to CFG is closed at 0.60 of its UNet passes, with no guide and no training. The carried correction
is the model's own, so it works on any checkpoint (a fine-tune, LoRA weights) and keeps a negative prompt's effect.

The factors belong to a model: fitted for one scheduler and step count, they are read at another's timesteps by
:meth:`CorrectionCarry.resampled`. They hardly depend on w (fitted at w = 3, 5 and 7.5 they differ by < 0.06 after
the fifth step) or on the prompts they were fitted on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

FIT_GUIDANCE_SCALE = 5.0  # the factors hardly depend on w: one fit serves the usual range
GUIDE_CARRY_FILE = "correction_carry.json"  # in a guide's folder: the carry it was shipped with (a guide distilled on the first steps)


@dataclass
class CorrectionCarry:
    """After the first `full_steps` steps, the correction at model call k is `factors[k]` times the one before.

    timesteps: the model calls' timesteps the factors were fitted for (to refuse another scheduler or step count)."""

    full_steps: int
    timesteps: list[float]
    factors: list[float]

    def __post_init__(self):
        if isinstance(self.full_steps, bool) or not isinstance(self.full_steps, int) or self.full_steps < 1:
            raise ValueError(f"full_steps must be a whole number >= 1 (the steps that run CFG in full before the correction is carried), got {self.full_steps!r}")
        if len(self.factors) != len(self.timesteps):
            raise ValueError(f"a CorrectionCarry needs one factor per model call: {len(self.factors)} factors for {len(self.timesteps)} timesteps")

    @classmethod
    @torch.no_grad()
    def fit(cls, pipe, prompts: list[str], full_steps: int = 5, num_inference_steps: int = 25,
            guidance_scale: float = FIT_GUIDANCE_SCALE, height: int | None = None, width: int | None = None,
            negative_prompt: str | list[str] | None = None, batch_size: int = 8, seed: int = 0) -> "CorrectionCarry":
        """Fit the factors on CFG sampling of `prompts` with `pipe` (a PlugAndPlayPipeline or its SDXL sibling, with
        the scheduler it will sample with): a_k = <d_k, d_{k-1}> / |d_{k-1}|^2 over all prompts, least squares.
        Costs CFG's two UNet passes per step and prompt."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("CorrectionCarry.fit needs a non-empty list of prompts to sample CFG on (a few like the ones you will use)")
        if guidance_scale == 1:
            raise ValueError("CorrectionCarry.fit needs guidance_scale != 1: at w = 1 CFG has no correction to fit")
        timesteps, numerator, denominator = [], {}, {}
        for start in range(0, len(prompts), batch_size):
            corrections = []

            def record(step):
                corrections.append((step.output - step.conditional).float() / (guidance_scale - 1))
                if start == 0:
                    timesteps.append(float(step.timestep))

            generator = torch.Generator().manual_seed(seed + start)
            with pipe.model_output_observer(record):
                pipe(prompts[start:start + batch_size], height=height, width=width, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, negative_prompt=negative_prompt, generator=generator, mode="cfg",
                     output_type="latent")
            for k in range(1, len(corrections)):
                numerator[k] = numerator.get(k, 0.0) + (corrections[k] * corrections[k - 1]).sum().item()
                denominator[k] = denominator.get(k, 0.0) + corrections[k - 1].pow(2).sum().item()
        factors = [1.0] + [numerator[k] / denominator[k] if denominator[k] > 0 else 1.0 for k in range(1, len(timesteps))]
        return cls(full_steps, timesteps, factors)

    def with_full_steps(self, full_steps: int) -> "CorrectionCarry":
        """The same factors, carried on after `full_steps` steps in full."""
        return dataclasses.replace(self, full_steps=full_steps)

    def resampled(self, timesteps: list[float]) -> "CorrectionCarry":
        """This carry for other model calls (another step count or scheduler on the same model). The fitted factors
        trace how the correction's size changes with t; that curve is read at the new timesteps (log-linear between the
        fitted ones), and the full steps become those at or above the last timestep that was run in full."""
        timesteps = [float(t) for t in timesteps]
        if self.fits(timesteps):
            return self
        fitted = np.array(self.timesteps[::-1])  # ascending, for np.interp
        level = np.cumsum([math.log(max(a, 1e-3)) for a in self.factors])[::-1]  # log size relative to the first call
        read = np.interp(timesteps, fitted, level)
        factors = [1.0] + [float(math.exp(b - a)) for a, b in zip(read, read[1:])]
        full_until = self.timesteps[min(self.full_steps, len(self.timesteps)) - 1]
        full_steps = max(1, sum(t >= full_until - 1e-6 for t in dict.fromkeys(timesteps)))
        return CorrectionCarry(full_steps, timesteps, factors)

    def fits(self, timesteps: list[float]) -> bool:
        """Whether the factors were fitted for these model calls' timesteps (this scheduler and step count)."""
        return [float(t) for t in timesteps] == [float(t) for t in self.timesteps]

    def check_timesteps(self, timesteps: list[float]) -> None:
        """One line naming both schedules when the factors were fitted for another scheduler or step count."""
        if not self.fits(timesteps):
            raise ValueError(f"correction_carry was fitted for {len(self.timesteps)} model calls from t = {self.timesteps[0]:g}, but "
                             f"sampling makes {len(timesteps)} from t = {float(timesteps[0]):g}: fit it again with this "
                             "num_inference_steps and scheduler")

    def save(self, path: str | Path) -> Path:
        """A small JSON file: fit once per model, scheduler and step count, reuse it."""
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CorrectionCarry":
        try:
            fields = json.loads(Path(path).read_text())
            return cls(int(fields["full_steps"]), [float(t) for t in fields["timesteps"]], [float(a) for a in fields["factors"]])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a saved CorrectionCarry ({error}): make one with CorrectionCarry.fit(...).save(path)") from None
