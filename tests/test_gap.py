"""Gap closed (evaluation/gap.py): the arithmetic on hand-made images and sums."""

import numpy as np
import pytest
from PIL import Image

from pnpguide.evaluation.gap import gap_closed, image_gap_closed, image_mse, step_gaps


def _flat(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value, value, value))


def _random_images(seed: int, n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]


def test_image_gap_closed_is_one_at_cfg_images_and_zero_at_unguided_images():
    cfg, unguided = _random_images(0), _random_images(1)
    assert image_gap_closed(cfg, unguided, cfg) == 1.0
    assert image_gap_closed(unguided, unguided, cfg) == 0.0
    assert image_gap_closed(_random_images(2), unguided, cfg) < 0.5  # unrelated images: not closer than unguided


def test_image_gap_closed_pools_squared_errors_over_images_on_unit_pixels():
    """cfg black; unguided white (MSE 1) and gray 51 (0.2^2 = 0.04); the method gets the first image right and
    the second as wrong as unguided: pooled 1 - 0.04 / 1.04, not the mean of per-image gaps (0.5)."""
    cfg, unguided, method = [_flat(0), _flat(0)], [_flat(255), _flat(51)], [_flat(0), _flat(51)]
    assert image_mse(unguided, cfg) == pytest.approx(1.04 / 2)
    assert image_gap_closed(method, unguided, cfg) == pytest.approx(1 - 0.04 / 1.04)


def test_gap_closed_is_undefined_when_no_guidance_already_is_cfg():
    assert gap_closed(0.0, 0.0) is None
    assert gap_closed(3.0, 2.0) == pytest.approx(-0.5)  # further from CFG than no guidance


def test_step_gaps_sum_over_steps_and_keep_each_timestep_in_order():
    overall, per_step = step_gaps({900: 1.0, 500: 0.0, 100: 3.0}, {900: 2.0, 500: 1.0, 100: 2.0})
    assert overall == pytest.approx(1 - 4.0 / 5.0)  # pooled, not the mean of the per-step values (1/3)
    assert [(s.timestep, s.gap_closed) for s in per_step] == [(900, 0.5), (500, 1.0), (100, -0.5)]

