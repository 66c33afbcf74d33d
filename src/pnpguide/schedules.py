"""Guidance schedules: a w per sampling step instead of one w for the whole trajectory.

The guide takes w as an input at every step, so it can follow any schedule it was trained on the range of,
with no retraining; the CFG teacher follows the same schedule, so the two can be compared step by step.
A schedule is resolved into a plain list of floats once, before sampling, so the denoising loop only indexes it.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

GuidanceScale = float | Sequence[float] | Callable[[int, float], float]


def guidance_schedule(
    guidance_scale: GuidanceScale,
    timesteps: Sequence[float],
    guidance_interval: tuple[float, float] | None = None,
    num_train_timesteps: int = 1000,
) -> list[float]:
    """One w per sampling step (diffusers' convention, w = 1: no guidance), checked.

    Args:
        guidance_scale: a constant w (> 0, as in StableDiffusionPipeline); a list or tuple with one w >= 1 per
            step; or a callable `(step_index, timestep) -> w` (w >= 1), called once per step, here.
        timesteps: the scheduler's timesteps, in sampling order, as Python numbers: one per model call; a timestep
            that repeats (PNDM, Heun) is one step, so lists and callables give one w per distinct timestep.
        guidance_interval: `(t_low, t_high)`: w applies only at timesteps with t_low <= t <= t_high, and w = 1
            elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and
            distribution quality in diffusion models"). None: w applies at every step.
        num_train_timesteps: the scheduler's training timesteps, the bound for `guidance_interval`.

    Raises ValueError, in one line naming the bad value, for a w that is not finite or is below the minimum,
    a list of the wrong length, or an interval that is reversed or outside [0, num_train_timesteps].
    """
    _check_interval(guidance_interval, num_train_timesteps)
    # a step is a distinct timestep: PNDM (SD 1.x's default) and Heun evaluate the model twice at some timesteps
    # (N steps, N + 1 or 2N - 1 calls), and both calls at a timestep take that step's w
    steps = list(dict.fromkeys(timesteps))
    if callable(guidance_scale):
        scales = [_called(guidance_scale, index, t) for index, t in enumerate(steps)]
    elif isinstance(guidance_scale, (list, tuple)):
        scales = _listed(guidance_scale, len(steps))
    else:
        scales = [_constant(guidance_scale)] * len(steps)
    w_at = {t: w if guided_at(t, guidance_interval) else 1.0 for w, t in zip(scales, steps)}
    return [w_at[t] for t in timesteps]


def guided_at(timestep, guidance_interval: tuple[float, float] | None) -> bool:
    """Whether guidance applies at `timestep`: everywhere without an interval, else only at t_low <= t <= t_high."""
    return guidance_interval is None or guidance_interval[0] <= float(timestep) <= guidance_interval[1]


def linear_schedule(w_start: float, w_end: float, num_steps: int) -> list[float]:
    """w ramped linearly from `w_start` at the first step to `w_end` at the last (the CLI's `linear:W0:W1`)."""
    if num_steps == 1:
        return [float(w_start)]
    return [w_start + (w_end - w_start) * i / (num_steps - 1) for i in range(num_steps)]


def parse_w_schedule(text: str, num_steps: int) -> list[float]:
    """The CLI's `--w-schedule`: "3,5,7.5,..." (one w per step) or "linear:W0:W1" (a ramp over the steps)."""
    try:
        if text.startswith("linear:"):
            w_start, w_end = (float(part) for part in text.removeprefix("linear:").split(":"))
            return linear_schedule(w_start, w_end, num_steps)
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--w-schedule must be comma-separated numbers (one w per step) or linear:W0:W1, got {text!r}") from None


def _check_interval(guidance_interval: tuple[float, float] | None, num_train_timesteps: int) -> None:
    if guidance_interval is None:
        return
    bad = f"guidance_interval must be (t_low, t_high) with 0 <= t_low <= t_high <= {num_train_timesteps}, got {guidance_interval!r}"
    try:
        t_low, t_high = (float(t) for t in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(bad) from None
    if not 0 <= t_low <= t_high <= num_train_timesteps:
        raise ValueError(bad)


def _constant(guidance_scale: float) -> float:
    """A constant keeps StableDiffusionPipeline's rule, w > 0; 0 < w < 1 is anti-guidance, allowed as before."""
    w = _number(guidance_scale)
    if w is None or not math.isfinite(w) or w <= 0:
        raise ValueError(f"guidance_scale must be a finite number > 0 (1 = no guidance), got {guidance_scale}")
    return w


def _listed(guidance_scale: Sequence[float], num_steps: int) -> list[float]:
    if len(guidance_scale) != num_steps:
        raise ValueError(f"guidance_scale has {len(guidance_scale)} values but sampling takes {num_steps} steps: give one w per step")
    for index, value in enumerate(guidance_scale):
        _check_step_w(value, f"guidance_scale[{index}] is {value!r}")
    return [float(value) for value in guidance_scale]


def _called(guidance_scale: Callable[[int, float], float], index: int, timestep: float) -> float:
    value = guidance_scale(index, timestep)
    return _check_step_w(value, f"guidance_scale returned {value!r} at step {index} (timestep {timestep})")


def _check_step_w(value, what: str) -> float:
    """A scheduled w must be >= 1: below 1 would push away from the prompt, which neither the guide nor the
    interval rule (w = 1 outside) means; it is almost always a schedule written in the other CFG convention."""
    w = _number(value)
    if w is None or not math.isfinite(w) or w < 1:
        raise ValueError(f"{what}: each w must be a finite number >= 1 (1 = no guidance)")
    return w


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
