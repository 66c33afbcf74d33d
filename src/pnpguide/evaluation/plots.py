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
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
