"""`pnpguide demo`: the embedded model without guidance, with the CFG teacher and with the guides, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .embedded.base_report import grid_captions
from .evaluation.negative_prompts import eval_negatives
from .evaluation.plots import captioned_grid
from .evaluation.sampling import generate_images
from .evaluation.speed import UNetCallCounter, median_seconds, step_cost
from .generate import fitting_carry, guide_carry
from .guide import GuideModel
from .loading import load_guide, load_plug_and_play, shipped_guide_dirs
from .pipeline import follow_unet


@dataclass(frozen=True)
class DemoRow:
    label: str
    mode: str
    steps: int
    guide: GuideModel | None = None
    negative_prompt: bool = False  # samples with the demo's negative prompts


@dataclass(frozen=True)
class ModeTiming:
    label: str
    steps: int
    seconds_per_image: float
    unet_images_per_image: float  # UNet evaluations per generated image (a 2B CFG batch counts 2 per image)
    gflops_per_image: float


def demo_rows(guide: GuideModel, steps: int, negatives: bool = False) -> list[DemoRow]:
    """No guidance, CFG and the guide at `steps`; with `negatives`, CFG and the guide again with the negative prompts;
    then each shipped step-distilled guide at its own step counts."""
    rows = [DemoRow("no guidance (w=1)", "none", steps), DemoRow("CFG teacher", "cfg", steps), DemoRow("guide", "guide", steps, guide)]
    if negatives:
        ignored = "" if guide.reads_negative_prompt else " (ignored)"  # a guide distilled without negatives: the same images
        rows += [DemoRow("CFG teacher, negative", "cfg", steps, None, True), DemoRow(f"guide, negative{ignored}", "guide", steps, guide, True)]
    for folder in shipped_guide_dirs():
        distilled = load_guide(folder)
        for count in distilled.config.trained_step_counts or ():
            rows.append(DemoRow(f"{folder.name} guide", "guide", count, distilled))
    return rows


def run_demo(
    out_dir: str | Path = "pnpguide-demo",
    guide: str | None = None,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    negative_prompts: str | None = None,
):
    """Write `grid.png` and return one ModeTiming per row (wall time measured here, FLOPs counted).

    `progress` receives one line per phase (the CLI prints them): the demo runs for a minute or more on a CPU.
    `negative_prompts`: a file or `caption-attributes`, as `pnpguide eval --negative-prompts` takes it; adds rows of
    CFG and the guide with them, and names each column's negative.
    """
    say = progress or (lambda line: None)
    captions = grid_captions()
    negatives = eval_negatives(negative_prompts, captions)  # a bad value fails before anything loads
    say(f"loading the embedded base and the {guide or 'tiny'} guide")
    pipe = load_plug_and_play(guide=guide, dtype=dtype, device=device)
    main_guide, carry = pipe.guide, fitting_carry(pipe, guide_carry(guide), steps)  # a first-steps guide's own carry, as `generate` uses it
    images, timings = {}, []
    rows = demo_rows(pipe.guide, steps, negatives is not None)
    for number, row in enumerate(rows, 1):
        say(f"[{number}/{len(rows)}] {row.label}, {row.steps} steps: sampling {len(captions)} images, then timing them")
        pipe.guide = follow_unet(row.guide, pipe.unet)  # None for "none" and "cfg": they never call it
        w = 1.0 if row.mode == "none" else guidance_scale
        cost = step_cost(pipe.unet, row.guide, tokens=pipe.tokenizer.model_max_length)
        flops = {"none": cost.unet, "cfg": cost.cfg, "guide": cost.guided}[row.mode] * row.steps

        def sample():
            return generate_images(pipe, captions, w, row.steps, seed, mode=row.mode, batch_size=len(captions), progress=False,
                                   negative_prompts=negatives if row.negative_prompt else None,
                                   correction_carry=carry if row.mode == "guide" and row.guide is main_guide else None)

        counter = UNetCallCounter(pipe.unet)
        images[f"{row.label}, {row.steps} steps"] = sample()
        counter.close()
        seconds = median_seconds(sample, repeats=3, warmup=0) / len(captions)
        timings.append(ModeTiming(row.label, row.steps, seconds, counter.images / len(captions), flops / 1e9))
    say(f"writing the grid to {Path(out_dir) / 'grid.png'}")
    columns = [f"{c} [negative: {n}]" for c, n in zip(captions, negatives)] if negatives else captions
    grid = captioned_grid(images, columns, Path(out_dir) / "grid.png", title=f"embedded base, w={guidance_scale}, DDIM, same seeds")
    return grid, timings


def timing_table(timings: list[ModeTiming]) -> str:
    cfg = next(t for t in timings if t.label == "CFG teacher")
    lines = ["| mode | steps | s / image | UNet evals / image | GFLOPs / image | speed-up vs CFG |", "|---|---|---|---|---|---|"]
    for t in timings:
        lines.append(
            f"| {t.label} | {t.steps} | {t.seconds_per_image:.4f} | {t.unet_images_per_image:.0f} | {t.gflops_per_image:.2f} | "
            f"{cfg.seconds_per_image / t.seconds_per_image:.2f}x |"
        )
    return "\n".join(lines)
