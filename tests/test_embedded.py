"""Integration tests on the shipped embedded model and guides (CPU, a few seconds each)."""

import dataclasses

import numpy as np
import torch
import pytest

from pnpguide.embedded import shapes
from pnpguide.demo import run_demo
from pnpguide.embedded.adherence import adherence
from pnpguide.evaluation.sampling import generate_images, psnr
from pnpguide.guides import OutputGuide
from pnpguide.loading import default_guide_dir, load_plug_and_play

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipe():
    return load_plug_and_play()


def test_shipped_guides_fit_the_embedded_base(pipe):
    for name in ("default", "8-step", "4-step", "paper"):
        assert (default_guide_dir(name) / "config.json").is_file()
        card = (default_guide_dir(name) / "README.md").read_text()  # a model card, with what was measured
        assert f"# {name}\n" in card and "## Measured" in card and "Not measured yet" not in card and "```bash\npnpguide" in card
    assert pipe.guide.config._name_or_path == str(default_guide_dir()) and pipe.guide.correction_carry is not None
    low, high = pipe.guide.config.trained_guidance_range
    assert low <= 7.5 <= high


def test_shipped_default_guide_is_closer_to_the_teacher_than_no_guidance(pipe):
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
    assert lines[0] == "loading the embedded base and the default guide" and lines[-1] == f"writing the grid to {grid}"
    assert len(lines) == len(timings) + 2 and lines[1].startswith(f"[1/{len(timings)}] no guidance (w=1), 4 steps: sampling")
    evals = {t.label: t.unet_images_per_image for t in timings[:3]}
    assert evals == {"no guidance (w=1)": 4, "CFG": 8, "guide default": 4}  # the default guide's carry: one pass a step
    others = {t.label: (t.steps, t.unet_images_per_image) for t in timings[3:]}
    assert others == {"guide 8-step": (8, 8), "guide 4-step": (4, 4), "guide paper": (4, 4)}  # distilled ones at their own counts


def test_a_guide_trains_on_the_mixed_source(tmp_path):
    """`--source mix`: half of each batch noised dataset latents, half CFG-trajectory states (only the embedded
    model has the shapes images, so this runs on it)."""
    from pnpguide.loading import load_pipeline
    from pnpguide.distill_guidance import GuidanceDistillConfig, _split, train_guide
    from pnpguide.embedded.source import ShapesData
    from pnpguide.sources import training_pools
    from pnpguide.training import make_accelerator

    assert _split(5, 2) == [3, 2] and _split(4, 1) == [4]
    config = GuidanceDistillConfig(
        output_dir=str(tmp_path / "run"), source="mix", num_samples=32,
        trajectories=4, trajectory_steps=2, max_steps=2, batch_size=4, lr_warmup_steps=0, checkpointing_steps=2,
    )
    pools = training_pools(load_pipeline(), dataclasses.replace(config, output_dir=str(tmp_path / "pools")), make_accelerator(config), "states", 7,
                           base_data=ShapesData())
    assert [len(p) for p in pools] == [32, 4 * 2]
    data, states = (p.rows(torch.arange(4)) for p in pools)
    assert data.timesteps is None and states.timesteps is not None
    assert set(states.prompts) <= set(pools[0].prompts)  # trajectories are sampled from the data's captions
    guide = train_guide(config, ShapesData())
    assert isinstance(guide, OutputGuide) and guide.config.trained_first_steps is None  # every state: not trajectories alone
    assert guide.config.trained_text_encoder.startswith("BertModel (")
    assert (tmp_path / "run" / "guide" / "config.json").is_file()
