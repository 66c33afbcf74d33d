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
from .guides import GuideModel
from .loading import load_guide, load_plug_and_play, shipped_guides
from .pipeline import follow_unet


@dataclass(frozen=True)
class DemoRow:
    label: str
    mode: str
    steps: int | None  # None: the guide's own (its policy's step count)
    guide: GuideModel | None = None
    negative_prompt: bool = False  # samples with the demo's negative prompts


@dataclass(frozen=True)
class ModeTiming:
    label: str
    steps: int
    seconds_per_image: float
    unet_images_per_image: float  # UNet evaluations per generated image (a 2B CFG batch counts 2 per image)
    gflops_per_image: float


def demo_rows(guide: GuideModel, name: str, steps: int, negatives: bool = False) -> list[DemoRow]:
    """No guidance, CFG and the guide at `steps` (the guide with its own policy); with `negatives`, CFG and the guide again
    with the negative prompts; then every other shipped guide, at its own step count."""
    rows = [DemoRow("no guidance (w=1)", "none", steps), DemoRow("CFG", "cfg", steps), DemoRow(f"guide {name}", "guide", steps, guide)]
    if negatives:
        ignored = "" if guide.reads_negative_prompt else " (ignored)"  # a guide without a negative head: the same images
        rows += [DemoRow("CFG, negative", "cfg", steps, None, True), DemoRow(f"guide {name}, negative{ignored}", "guide", steps, guide, True)]
    for other, folder in shipped_guides().items():
        if other != name:
            extra = load_guide(folder)
            rows.append(DemoRow(f"guide {other}", "guide", extra.policy.num_inference_steps or steps, extra))
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
    name = Path(guide).name if guide is not None else "default"
    say(f"loading the embedded base and the {name} guide")
    pipe = load_plug_and_play(guide=guide, dtype=dtype, device=device)
    images, timings = {}, []
    rows = demo_rows(pipe.guide, name, steps, negatives is not None)
    for number, row in enumerate(rows, 1):
        say(f"[{number}/{len(rows)}] {row.label}, {row.steps} steps: sampling {len(captions)} images, then timing them")
        pipe.guide = follow_unet(row.guide, pipe.unet)  # None for "none" and "cfg": they never call it
        w = 1.0 if row.mode == "none" else guidance_scale
        cost = step_cost(pipe.unet, row.guide, tokens=pipe.tokenizer.model_max_length)

        def sample():
            return generate_images(pipe, captions, w, row.steps, seed, mode=row.mode, batch_size=len(captions), progress=False,
                                   negative_prompts=negatives if row.negative_prompt else None)

        counters = [UNetCallCounter(module) for module in (pipe.unet, row.guide) if module is not None]
        images[f"{row.label}, {row.steps} steps"] = sample()
        for counter in counters:
            counter.close()
        unet_images, guide_images = counters[0].images / len(captions), (counters[1].images / len(captions) if len(counters) > 1 else 0)
        seconds = median_seconds(sample, repeats=3, warmup=0) / len(captions)
        flops = unet_images * cost.unet + guide_images * cost.guide
        timings.append(ModeTiming(row.label, row.steps, seconds, unet_images, flops / 1e9))
    say(f"writing the grid to {Path(out_dir) / 'grid.png'}")
    columns = [f"{c} [negative: {n}]" for c, n in zip(captions, negatives)] if negatives else captions
    grid = captioned_grid(images, columns, Path(out_dir) / "grid.png", title=f"embedded base, w={guidance_scale}, same seeds")
    return grid, timings


def timing_table(timings: list[ModeTiming]) -> str:
    cfg = next(t for t in timings if t.label == "CFG")
    lines = ["| mode | steps | s / image | UNet evals / image | GFLOPs / image | speed-up vs CFG |", "|---|---|---|---|---|---|"]
    for t in timings:
        lines.append(
            f"| {t.label} | {t.steps} | {t.seconds_per_image:.4f} | {t.unet_images_per_image:.0f} | {t.gflops_per_image:.2f} | "
            f"{cfg.seconds_per_image / t.seconds_per_image:.2f}x |"
        )
    return "\n".join(lines)
