"""How a sampling call spends its guidance: the one object pnpguide adds to diffusers' call, beside `mode`.

CFG runs the UNet twice at every step. What pnpguide measured to cost less for nearly the same image, in one
object (in the spirit of diffusers' `guiders`):
- `carry`: run the full correction (the guide, or CFG's two passes) for the first steps only, then carry it on with
  the model's own fitted factors (:class:`pnpguide.CorrectionCarry`): one UNet pass per step after them.
- `adaptive_threshold`: Adaptive Guidance (Castillo et al., AAAI 2025), in CFG mode: each image runs CFG until the
  cosine of its conditional and unconditional outputs reaches the threshold, then (with a `carry`, its correction
  carried on; without, the conditional pass alone).
- `interval`: guidance only at timesteps t_low <= t <= t_high (Kynkaanniemi et al. 2024), the plain UNet elsewhere.
- `timesteps`: the grid a step-distilled guide was distilled on, sampled by deterministic DDIM from each to the next.
- `negative`: the policy to use instead when the call has a negative prompt (a negative needs more guided steps).

A guide's folder records its own policy (:attr:`pnpguide.GuideModel.policy`), which the pipeline applies when a call
gives none; `GuidancePolicy()` runs the guide, or CFG, at every step of the scheduler's grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .carry import CorrectionCarry


@dataclass(frozen=True)
class GuidancePolicy:
    carry: CorrectionCarry | None = None  # the full correction for carry.full_steps steps, then carried on (one UNet pass a step)
    interval: tuple[float, float] | None = None  # (t_low, t_high): guidance only at these timesteps, w = 1 elsewhere
    timesteps: tuple[int, ...] | None = None  # a step-distilled guide's grid (descending), sampled with DDIM
    scheduler_config: dict | None = field(default=None, compare=False)  # the DDIM config of that grid
    adaptive_threshold: float | None = None  # CFG mode: CFG per image until cos(cond, uncond) >= this (Adaptive Guidance)
    negative: GuidancePolicy | None = None  # used instead when a negative prompt is given (None: this one)

    def __post_init__(self):
        if self.carry is not None and not isinstance(self.carry, CorrectionCarry):
            raise ValueError(f"carry must be a pnpguide.CorrectionCarry (CorrectionCarry.fit(pipe, prompts)), got {type(self.carry).__name__}")
        if self.interval is not None:
            check_interval(self.interval)
        if self.timesteps is not None:
            steps = [int(t) for t in self.timesteps]
            if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[-1] < 0:
                raise ValueError(f"timesteps must be a non-empty, strictly descending list of timesteps >= 0, got {list(self.timesteps)}")
            if self.scheduler_config is None:
                raise ValueError("timesteps are a step-distilled guide's DDIM grid: give its scheduler_config too")
        threshold = self.adaptive_threshold
        if threshold is not None and not (isinstance(threshold, (int, float)) and -1 < threshold <= 1):
            raise ValueError(f"adaptive_threshold must be a cosine in (-1, 1], got {threshold!r}")
        if self.negative is not None and self.negative.negative is not None:
            raise ValueError("a policy's negative policy cannot have a negative policy of its own")

    @classmethod
    def for_guide(cls, config, carry: CorrectionCarry | None = None) -> "GuidancePolicy":
        """The policy a guide's config and carry record (see pnpguide.guides.base): its grid, its first steps with the
        carry (with a negative prompt, its negative head's first steps), its default interval without a negative."""
        timesteps = getattr(config, "trained_timesteps", None)
        grid = dict(timesteps=tuple(int(t) for t in timesteps), scheduler_config=dict(config.trained_schedule)) if timesteps else {}
        first_steps = getattr(config, "trained_first_steps", None)
        negative_steps = getattr(config, "negative_first_steps", None)
        carried = carry.with_full_steps(first_steps) if carry is not None and first_steps else None
        negative_carry = carry.with_full_steps(max(negative_steps or 0, first_steps)) if carried is not None else None
        interval = getattr(config, "default_guidance_interval", None)
        negative = cls(carry=negative_carry, **grid)
        own = cls(carry=carried, interval=tuple(interval) if interval else None, **grid)
        return own if own == negative else cls(carry=carried, interval=own.interval, negative=negative, **grid)

    def for_call(self, negative_prompt: bool) -> "GuidancePolicy":
        """The policy that applies to a call with (or without) a negative prompt."""
        return self.negative if negative_prompt and self.negative is not None else self

    @property
    def num_inference_steps(self) -> int | None:
        """The step count this policy was made for (a grid's length, a carry's steps), or None: any."""
        if self.timesteps is not None:
            return len(self.timesteps)
        return len(dict.fromkeys(self.carry.timesteps)) if self.carry is not None else None

    def describe(self) -> str:
        """This policy in one line: its grid or step count, where the correction is run and carried, its interval, and
        what changes with a negative prompt."""
        words = []
        if self.timesteps is not None:
            words.append(f"{len(self.timesteps)} steps on its own grid (t = {', '.join(map(str, self.timesteps))})")
        if self.carry is not None:
            words.append(f"{self.num_inference_steps} steps by default; the first {self.carry.full_steps} run the full correction, then "
                         "it is carried on (other step counts read the carry at their own timesteps)")
        if self.adaptive_threshold is not None:
            words.append(f"CFG per image until cos(cond, uncond) >= {self.adaptive_threshold:g} (Adaptive Guidance)")
        if self.interval is not None:
            words.append(f"guidance only at t in [{self.interval[0]:g}, {self.interval[1]:g}]")
        if not words:
            words.append("the full correction at every step of the scheduler's grid")
        if self.negative is not None:
            negative = self.negative
            change = (f"runs the first {negative.carry.full_steps} steps in full" if negative.carry is not None
                      else "guides every step" if negative.interval is None else "guides in its own interval")
            words.append(f"with a negative prompt it {change}")
        return "; ".join(words)

    def guided_at(self, timestep: float) -> bool:
        """Whether guidance applies at `timestep`: everywhere without an interval, else only inside it."""
        return self.interval is None or self.interval[0] <= float(timestep) <= self.interval[1]


def check_interval(interval, num_train_timesteps: int = 1000) -> tuple[float, float]:
    """(t_low, t_high) as two numbers, 0 <= t_low <= t_high <= num_train_timesteps, or one line saying what is wrong."""
    bad = f"interval must be (t_low, t_high) with 0 <= t_low <= t_high <= {num_train_timesteps}, got {interval!r}"
    try:
        t_low, t_high = (float(t) for t in interval)
    except (TypeError, ValueError):
        raise ValueError(bad) from None
    if not (math.isfinite(t_low) and math.isfinite(t_high) and 0 <= t_low <= t_high <= num_train_timesteps):
        raise ValueError(bad)
    return t_low, t_high
