"""How much of the gap between no guidance and CFG a method closes: the one place this arithmetic is written.

FID and adherence cannot say whether a guide reproduces CFG: a milder guidance scores well on both. These
measures compare with CFG itself, relative to the conditional model (w = 1), so 1 means "CFG's result" and
0 means "no closer than no guidance" (negative: further away).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


def gap_closed(error: float, baseline_error: float) -> float | None:
    """1 - error / baseline_error, where both are squared distances to CFG's result (summed or averaged the
    same way) and the baseline is the conditional model's; None when the baseline already is CFG (w = 1)."""
    return None if baseline_error == 0 else 1.0 - error / baseline_error


def images_as_floats(images: list[Image.Image]) -> np.ndarray:
    """(N, H, W, C) float64 in [0, 1] from 8-bit images."""
    return np.stack([np.asarray(image, dtype=np.float64) for image in images]) / 255.0


def image_mse(images: list[Image.Image], references: list[Image.Image]) -> float:
    """Mean squared error on [0, 1] pixels, pooled over all images (they share one size)."""
    return float(np.mean((images_as_floats(images) - images_as_floats(references)) ** 2))


def image_gap_closed(images: list[Image.Image], unguided: list[Image.Image], cfg: list[Image.Image]) -> float | None:
    """1 - MSE(images, cfg) / MSE(unguided, cfg): the three lists hold the same prompts and seeds, image by image."""
    return gap_closed(image_mse(images, cfg), image_mse(unguided, cfg))


@dataclass
class StepGap:
    """The gap closed at one timestep of the teacher's trajectory, over every image compared there."""

    timestep: int
    gap_closed: float | None


def step_gaps(errors: dict[int, float], baselines: dict[int, float]) -> tuple[float | None, list[StepGap]]:
    """The gap closed over all steps (squared errors summed over timesteps), and at each timestep in sampling order.

    errors, baselines: timestep -> summed squared distance to CFG's output, of the method and of the
    conditional model, at the same states."""
    per_step = [StepGap(t, gap_closed(errors[t], baselines[t])) for t in baselines]
    return gap_closed(sum(errors.values()), sum(baselines.values())), per_step
