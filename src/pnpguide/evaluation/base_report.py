"""How good is a base model or fine-tune on its own: grids and held-out adherence at w = 1 vs w = 7.5."""

from __future__ import annotations

from pathlib import Path

from .. import data
from ..base import load_pipeline
from .adherence import adherence
from .plots import captioned_grid
from .sampling import generate_images


def grid_captions() -> list[str]:
    return data.heldout_captions(4, objects=1) + data.heldout_captions(4, objects=2)


def base_grid(base: str | None, out: str | Path, lora: str | None = None, style: str = "flat", steps: int = 25, seed: int = 0) -> Path:
    """Held-out captions (columns) at w = 1 and w = 7.5 (rows), same seeds."""
    pipe = load_pipeline(base, lora)
    captions = grid_captions()
    rows = {f"w={w}": generate_images(pipe, captions, w, steps, seed, progress=False) for w in (1.0, 7.5)}
    name = Path(base).name if base else "embedded base"
    return captioned_grid(rows, captions, out, title=f"{name}{' + LoRA' if lora else ''} ({style}), {steps} DDIM steps")


def base_adherence_table(
    base: str | None, lora: str | None, style: str, prompts: int, steps: int, scales: list[float], seed: int = 0
) -> str:
    """Markdown table: adherence on `prompts` held-out one-object and two-object captions per w."""
    pipe = load_pipeline(base, lora)
    lines = ["| w | one object | two objects |", "|---|---|---|"]
    for w in scales:
        cells = []
        for objects in (1, 2):
            captions = data.heldout_captions(prompts, objects=objects)
            cells.append(adherence(generate_images(pipe, captions, w, steps, seed), captions, style))
        lines.append(f"| {w} | {cells[0]:.3f} | {cells[1]:.3f} |")
    return "\n".join(lines)
