"""How good is a base model or fine-tune on its own: grids and held-out adherence at w = 1 vs w = 7.5."""

from __future__ import annotations

from pathlib import Path

import torch

from . import shapes
from ..loading import load_pipeline
from .adherence import FAILURE_KINDS, failure_counts, relation_accuracy
from ..evaluation.plots import captioned_grid
from ..evaluation.sampling import generate_images


def grid_captions() -> list[str]:
    return shapes.heldout_captions(4, objects=1) + shapes.heldout_captions(4, objects=2)


def base_grid(base: str | None, out: str | Path, lora: str | None = None, style: str = "flat", steps: int = 25, seed: int = 0,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Path:
    """Held-out captions (columns) at w = 1 and w = 7.5 (rows), same seeds."""
    pipe = load_pipeline(base, lora, dtype, device)
    captions = grid_captions()
    rows = {f"w={w}": generate_images(pipe, captions, w, steps, seed, progress=False) for w in (1.0, 7.5)}
    name = Path(base).name if base else "embedded base"
    return captioned_grid(rows, captions, out, title=f"{name}{' + LoRA' if lora else ''} ({style}), {steps} DDIM steps")


def base_adherence_table(
    base: str | None,
    lora: str | None,
    style: str,
    prompts: int,
    steps: int,
    scales: list[float],
    seed: int = 0,
    split: str = "heldout",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> str:
    """Markdown table: adherence on `prompts` one-object and two-object captions of `split` per w.

    The two-object failures are split by the judge's first failed check, and the relation column says
    how often an image that drew both objects right also put them the right way round.
    """
    pipe = load_pipeline(base, lora, dtype, device)
    lines = [
        "| w | one object | two objects | two objects: relation right when both objects are | two-object failures: "
        + " / ".join(FAILURE_KINDS)
        + " |",
        "|---|---|---|---|---|",
    ]
    for w in scales:
        counts = {}
        for objects in (1, 2):
            captions = shapes.split_captions(prompts, split, objects=objects)
            counts[objects] = failure_counts(generate_images(pipe, captions, w, steps, seed), captions, style)
        one, two = (counts[n]["ok"] / prompts for n in (1, 2))
        relation = relation_accuracy(counts[2])
        failures = " / ".join(str(counts[2][kind]) for kind in FAILURE_KINDS)
        lines.append(f"| {w} | {one:.3f} | {two:.3f} | {'n/a' if relation is None else f'{relation:.3f}'} | {failures} |")
    return "\n".join(lines)
