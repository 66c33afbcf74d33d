"""Integration tests on the shipped embedded model and guides (CPU, a few seconds each)."""

import dataclasses

import numpy as np
import torch
import pytest

from pnpguide.embedded import shapes
from pnpguide.demo import run_demo
from pnpguide.embedded.adherence import adherence
from pnpguide.evaluation.sampling import generate_images, psnr
from pnpguide.loading import default_guide_dir, load_plug_and_play

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipe():
    return load_plug_and_play()


def test_shipped_guides_fit_the_embedded_base(pipe):
    for size in ("tiny", "full"):
        assert (default_guide_dir(size) / "config.json").is_file()
    low, high = pipe.guide.config.trained_guidance_range
    assert low <= 7.5 <= high


def test_shipped_tiny_guide_is_closer_to_the_teacher_than_no_guidance(pipe):
    captions = shapes.heldout_captions(6, objects=1) + shapes.heldout_captions(6, objects=2)
    teacher = generate_images(pipe, captions, 7.5, 16, seed=3, mode="cfg", progress=False)
    guided = generate_images(pipe, captions, 7.5, 16, seed=3, mode="guide", progress=False)
    unguided = generate_images(pipe, captions, 7.5, 16, seed=3, mode="none", progress=False)
    guided_psnr = np.mean([min(psnr(g, t), 60) for g, t in zip(guided, teacher)])
    unguided_psnr = np.mean([min(psnr(u, t), 60) for u, t in zip(unguided, teacher)])
    assert guided_psnr > unguided_psnr + 1.0  # measured: +2.4 dB on 60 held-out captions (w=7.5, 25 steps)
    assert adherence(guided, captions) >= adherence(teacher, captions) - 0.2


def test_demo_writes_a_grid_and_counts_unet_evaluations(tmp_path):
    lines = []
    grid, timings = run_demo(tmp_path, steps=4, progress=lines.append)
    assert grid.is_file()
    assert lines[0] == "loading the embedded base and the tiny guide" and lines[-1] == f"writing the grid to {grid}"
    assert len(lines) == len(timings) + 2 and lines[1].startswith(f"[1/{len(timings)}] no guidance (w=1), 4 steps: sampling")
    evals = {t.label: t.unet_images_per_image for t in timings[:3]}
    assert evals == {"no guidance (w=1)": 4, "CFG teacher": 8, "guide": 4}
    assert all(t.unet_images_per_image == t.steps for t in timings[3:])  # step-distilled guides, at their own counts


def test_a_feature_reading_guide_trains_on_the_mixed_source(tmp_path):
    """`--source mix`: half of each batch noised dataset latents, half CFG-trajectory states (only the embedded
    model has the shapes images, so this runs on it)."""
    from pnpguide.loading import load_pipeline
    from pnpguide.distill_guidance import GuidanceDistillConfig, _split, train_guide
    from pnpguide.sources import training_pools
    from pnpguide.training import make_accelerator

    assert _split(5, 2) == [3, 2] and _split(4, 1) == [4]
    config = GuidanceDistillConfig(
        output_dir=str(tmp_path / "run"), source="mix", reads="unet_features", scale_by_guidance=True, num_samples=32,
        trajectories=4, trajectory_steps=2, max_steps=2, batch_size=4, lr_warmup_steps=0, checkpointing_steps=2,
    )
    pools = training_pools(load_pipeline(), dataclasses.replace(config, output_dir=str(tmp_path / "pools")), make_accelerator(config), "states", 7)
    assert [len(p) for p in pools] == [32, 4 * 2]
    data, states = (p.rows(torch.arange(4)) for p in pools)
    assert data.timesteps is None and states.timesteps is not None
    assert set(states.prompts) <= set(pools[0].prompts)  # trajectories are sampled from the data's captions
    guide = train_guide(config)
    assert guide.config.reads == "unet_features"
    assert guide.config.trained_text_encoder.startswith("BertModel (")
    assert (tmp_path / "run" / "guide" / "config.json").is_file()
