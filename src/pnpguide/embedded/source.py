"""The embedded model's own training data, as the distillation stages read a base's data (`pnpguide.sources.BaseData`):
its shapes captions for teacher trajectories, and its images for sources "shapes" and "mix"."""

from __future__ import annotations

import torch

from ..shards import TensorPool
from . import shapes
from .base import encode_images


class ShapesData:
    """The shapes dataset in the flat style, the embedded base's own."""

    def captions(self, count: int, seed: int) -> list[str]:
        """The captions of `count` scenes, repeats kept: teacher runs draw a caption uniformly from this list, so each
        kind of scene keeps its share. Half the scenes have one object but they have few distinct captions: drawn from
        the distinct captions, one-object prompts were 5% of the runs, and the guide fitted them worst (docs/findings.md)."""
        dataset = shapes.ShapesDataset(count, seed=seed)
        return [dataset.scene(i).caption for i in range(count)]

    def pool(self, pipe, count: int, seed: int) -> TensorPool:
        """`count` images encoded once and held in memory, with their captions."""
        dataset = shapes.ShapesDataset(count, style="flat", seed=seed)
        captions = [dataset.scene(i).caption for i in range(count)]
        unique = sorted(set(captions))
        lookup = {caption: i for i, caption in enumerate(unique)}
        return TensorPool(encode_images(pipe.vae, dataset).cpu(), torch.tensor([lookup[c] for c in captions]), unique)
