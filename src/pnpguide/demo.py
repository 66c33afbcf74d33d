"""`pnpguide demo`: the embedded model without guidance, with the CFG teacher and with the guide, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .evaluation.base_report import grid_captions
from .evaluation.plots import captioned_grid
from .evaluation.sampling import generate_images
from .evaluation.speed import UNetCallCounter, median_seconds, step_cost
from .loading import load_plug_and_play

MODES = {"no guidance (w=1)": "none", "CFG teacher": "cfg", "guide": "guide"}


@dataclass(frozen=True)
class ModeTiming:
    label: str
    seconds_per_image: float
    unet_images_per_image: float  # UNet evaluations per generated image (a 2B CFG batch counts 2 per image)
    gflops_per_image: float


def run_demo(out_dir: str | Path = "pnpguide-demo", guide: str | None = None, steps: int = 25, guidance_scale: float = 7.5, seed: int = 0):
    """Write `grid.png` and return one ModeTiming per mode (wall time measured here, FLOPs counted)."""
    pipe = load_plug_and_play(guide=guide)
    captions = grid_captions()
    cost = step_cost(pipe.unet, pipe.guide, tokens=pipe.tokenizer.model_max_length)
    flops = {"none": cost.unet, "cfg": cost.cfg, "guide": cost.guided}
    rows, timings = {}, []
    for label, mode in MODES.items():
        w = 1.0 if mode == "none" else guidance_scale

        def sample():
            return generate_images(pipe, captions, w, steps, seed, mode=mode, batch_size=len(captions), progress=False)

        counter = UNetCallCounter(pipe.unet)
        rows[label] = sample()
        counter.close()
        seconds = median_seconds(sample, repeats=3, warmup=0) / len(captions)
        timings.append(ModeTiming(label, seconds, counter.images / len(captions), flops[mode] * steps / 1e9))
    grid = captioned_grid(rows, captions, Path(out_dir) / "grid.png", title=f"embedded base, w={guidance_scale}, {steps} DDIM steps, same seeds")
    return grid, timings


def timing_table(timings: list[ModeTiming]) -> str:
    cfg = next(t for t in timings if t.label == "CFG teacher")
    lines = ["| mode | s / image | UNet evals / image | GFLOPs / image | speed-up vs CFG |", "|---|---|---|---|---|"]
    for t in timings:
        lines.append(
            f"| {t.label} | {t.seconds_per_image:.4f} | {t.unet_images_per_image:.0f} | {t.gflops_per_image:.2f} | "
            f"{cfg.seconds_per_image / t.seconds_per_image:.2f}x |"
        )
    return "\n".join(lines)
