"""Figures for people: captioned image grids (matplotlib)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def captioned_grid(rows: dict[str, list[Image.Image]], captions: list[str], path: str | Path, title: str = "") -> Path:
    """One row per method/setting (its label on the left), one column per caption (above)."""
    n_rows, n_cols = len(rows), len(captions)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols + 0.8, 1.6 * n_rows + 0.9), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(textwrap.fill(captions[c], 20), fontsize=6)
            if c == 0:
                ax.set_ylabel(textwrap.fill(label, 16), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def transfer_curve_plot(points: dict[str, list[tuple[float, float]]], path: str | Path, reach: float, title: str = "") -> Path:
    """Image gap closed against a fine-tune's distance from the base, one series per method, the library's reach marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, series in points.items():
        xs, ys = zip(*sorted(series))
        ax.plot(xs, ys, marker="o", linestyle=":", label=label)  # points of several fine-tunes, in order of distance
    ax.axvline(reach, color="gray", linestyle="--", linewidth=1)
    ax.text(reach, ax.get_ylim()[0], f" reach {reach:g}", color="gray", fontsize=8, va="bottom")
    ax.set_xscale("log")
    ticks = [v for v in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if min(x for s in points.values() for x, _ in s) / 1.5 <= v
             <= max(x for s in points.values() for x, _ in s) * 1.5]
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel("distance from the base: MSE(CFG_ft, CFG_base) / MSE(none_base, CFG_base)")
    ax.set_ylabel("image gap to the fine-tune's CFG closed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
