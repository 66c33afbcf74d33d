"""The procedural captioned "shapes" dataset that the embedded default model is trained on.

Every image is rendered from a :class:`Scene`, so its ground truth (objects, colours, positions) is
known exactly: that is what makes prompt adherence measurable without a human or a CLIP model.
Scenes are deterministic functions of an integer index and a seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")  # the base's shapes: its data (sample_scene) draws these and no others
# Shapes the renderer and the judge know but the base never saw: each is a concept a fine-tune can teach
# (sample_concept_scene), with the base's data and its judge's verdicts on SHAPES captions unchanged.
NEW_SHAPES = ("bar",)
BAR_HEIGHT = 1 / 3  # a bar is a horizontal rectangle this many times as tall as it is wide: its shape survives the VAE at every size
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 190),
    "cyan": (30, 210, 220),
    "orange": (250, 140, 20),
    "pink": (250, 120, 190),
}
BACKGROUNDS = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "brown": (110, 70, 40),
}
RELATIONS = ("above", "below", "left of", "right of")
SIZES = ("small", "large")
STYLES = ("flat", "outline", "textured", "pastel")
SUPERSAMPLE = 2  # render at 2x and downsample, for anti-aliased edges
HELD_OUT_FRACTION = 10  # one combination in this many is never used for training


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    center: tuple[float, float]  # (x, y) in pixels of the 64x64 image
    extent: float  # width = height of the bounding box, in pixels
    size: str  # "small" | "large"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]  # one or two; with two, objects[0] is `relation` objects[1]
    background: str
    relation: str | None
    mention_size: bool  # whether the caption names the size (single objects only)

    @property
    def caption(self) -> str:
        return caption_for(self)

    @property
    def combination(self) -> str:
        """The caption without size words: the unit that is held out from training."""
        return _combination_key(self)


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return style


def caption_for(scene: Scene) -> str:
    first = scene.objects[0]
    size = f"{first.size} " if scene.mention_size else ""
    text = _with_article(f"{size}{first.colour} {first.shape}")
    if scene.relation is not None:
        second = scene.objects[1]
        text += f" {scene.relation} " + _with_article(f"{second.colour} {second.shape}")
    return f"{text} on a {scene.background} background"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _combination_key(scene: Scene) -> str:
    parts = [f"{o.colour} {o.shape}" for o in scene.objects]
    return f"{parts[0]}|{scene.relation}|{parts[-1] if scene.relation else ''}|{scene.background}"


def is_held_out(combination: str) -> bool:
    """A fixed, seed-independent split: hashing keeps it stable across versions and machines."""
    digest = hashlib.sha256(combination.encode()).digest()
    return digest[0] % HELD_OUT_FRACTION == 0


def _place_single(rng: random.Random, shape: str, colour: str) -> ShapeObject:
    size = rng.choice(SIZES)
    extent = rng.uniform(14, 20) if size == "small" else rng.uniform(30, 40)
    half = extent / 2
    center = (rng.uniform(half + 3, IMAGE_SIZE - half - 3), rng.uniform(half + 3, IMAGE_SIZE - half - 3))
    return ShapeObject(shape, colour, center, extent, size)


def _place_pair(rng: random.Random, relation: str, shapes, colours) -> tuple[ShapeObject, ShapeObject]:
    """Put objects[0] in the half that `relation` names and objects[1] in the other half."""
    extents = [rng.uniform(12, 18) for _ in range(2)]
    along = [rng.uniform(14, 20), rng.uniform(44, 50)]  # first / second half, at least 6 px apart
    if relation in ("below", "right of"):
        along.reverse()
    across = [rng.uniform(16, 48) for _ in range(2)]
    vertical = relation in ("above", "below")
    objects = []
    for i in range(2):
        center = (across[i], along[i]) if vertical else (along[i], across[i])
        objects.append(ShapeObject(shapes[i], colours[i], center, extents[i], "small"))
    return objects[0], objects[1]


def sample_scene(index: int, seed: int = 0, split: str = "train", two_object_fraction: float = 0.5) -> Scene:
    """Deterministic scene for (seed, index), drawn from the `train` or `heldout` combinations."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{seed}:{split}:{index}")
    while True:  # rejection sampling: about 1 in 10 draws changes split
        background = rng.choice(list(BACKGROUNDS))
        if rng.random() < two_object_fraction:
            shapes = [rng.choice(SHAPES) for _ in range(2)]
            colours = rng.sample(list(COLOURS), 2)
            relation = rng.choice(RELATIONS)
            objects = _place_pair(rng, relation, shapes, colours)
            scene = Scene(objects, background, relation, mention_size=False)
        else:
            obj = _place_single(rng, rng.choice(SHAPES), rng.choice(list(COLOURS)))
            scene = Scene((obj,), background, None, mention_size=rng.random() < 0.5)
        if is_held_out(scene.combination) == (split == "heldout"):
            return scene


def check_concept(concept: str) -> str:
    if concept not in NEW_SHAPES:
        raise ValueError(f"unknown concept {concept!r}; a concept is a shape the base never drew: {', '.join(NEW_SHAPES)}")
    return concept


def sample_concept_scene(index: int, seed: int = 0, split: str = "train", concept: str = "bar", two_object_fraction: float = 0.5) -> Scene:
    """Like :func:`sample_scene`, but every scene shows `concept` (one of NEW_SHAPES): alone, or as one of two objects
    (the other a base shape, or the concept again one time in four). Deterministic for (seed, split, concept, index) and
    split into training and held-out combinations the same way; the base's own scenes never come from here."""
    check_concept(concept)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{seed}:{split}:{concept}:{index}")
    while True:
        background = rng.choice(list(BACKGROUNDS))
        if rng.random() < two_object_fraction:
            other = concept if rng.random() < 0.25 else rng.choice(SHAPES)
            pair = [concept, other] if rng.random() < 0.5 else [other, concept]
            colours = rng.sample(list(COLOURS), 2)
            relation = rng.choice(RELATIONS)
            scene = Scene(_place_pair(rng, relation, pair, colours), background, relation, mention_size=False)
        else:
            obj = _place_single(rng, concept, rng.choice(list(COLOURS)))
            scene = Scene((obj,), background, None, mention_size=rng.random() < 0.5)
        if is_held_out(scene.combination) == (split == "heldout"):
            return scene


def style_colour(rgb: tuple[int, int, int], style: str) -> tuple[int, int, int]:
    if style == "pastel":
        return tuple(int(0.55 * c + 0.45 * 255) for c in rgb)
    return rgb


def _shape_polygon(obj: ShapeObject, scale: float):
    cx, cy = obj.center[0] * scale, obj.center[1] * scale
    half = obj.extent * scale / 2
    if obj.shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if obj.shape == "bar":
        return [(cx - half, cy - half * BAR_HEIGHT), (cx + half, cy + half * BAR_HEIGHT)]
    return [(cx - half, cy - half), (cx + half, cy + half)]


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, style: str, scale: float) -> None:
    colour = style_colour(COLOURS[obj.colour], style)
    outline_only = style == "outline"
    kwargs = {"outline": colour, "width": int(3 * scale)} if outline_only else {"fill": colour}
    geometry = _shape_polygon(obj, scale)
    if obj.shape == "circle":
        draw.ellipse(geometry, **kwargs)
    elif obj.shape in ("square", "bar"):
        draw.rectangle(geometry, **kwargs)
    else:
        draw.polygon(geometry, **kwargs)


def _add_texture(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Diagonal stripes that modulate brightness plus grain: a 'photographic' domain for fine-tunes."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    stripes = 1.0 + 0.12 * np.sin((xx + yy) * (2 * np.pi / 8.0) + rng.uniform(0, 2 * np.pi))
    grain = rng.normal(0.0, 12.0, size=pixels.shape)
    return np.clip(pixels * stripes[..., None] + grain, 0, 255)


def render(scene: Scene, style: str = "flat", noise_seed: int = 0) -> Image.Image:
    """Render a scene as a 64x64 RGB image in one of :data:`STYLES`."""
    check_style(style)
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), style_colour(BACKGROUNDS[scene.background], style))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, style, SUPERSAMPLE)
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    if style == "textured":
        pixels = _add_texture(np.asarray(image, dtype=np.float64), np.random.default_rng(noise_seed))
        image = Image.fromarray(pixels.astype(np.uint8))
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1], the range diffusers' VAEs use."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


class ShapesDataset(torch.utils.data.Dataset):
    """`length` deterministic (image, caption) pairs of one style and split.

    Items are dicts with `pixel_values` (3, 64, 64) in [-1, 1] and `caption`, as diffusers' training
    examples expect. Rendering is cheap (~20k images/s), so nothing is cached on disk. With `concept` (one of
    NEW_SHAPES), every scene shows that shape (:func:`sample_concept_scene`): the data of a fine-tune that teaches it.
    """

    def __init__(self, length: int, style: str = "flat", split: str = "train", seed: int = 0, concept: str | None = None):
        self.length, self.style, self.split, self.seed = length, check_style(style), split, seed
        self.concept = None if concept is None else check_concept(concept)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if self.concept is not None:
            return sample_concept_scene(index, self.seed, self.split, self.concept)
        return sample_scene(index, self.seed, self.split)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        image = render(scene, self.style, noise_seed=hash((self.seed, index)) & 0xFFFF)
        return {"pixel_values": image_to_tensor(image), "caption": scene.caption}


def heldout_captions(count: int, seed: int = 1234, objects: int | None = None) -> list[str]:
    """`count` held-out captions (never seen in training), optionally only with 1 or 2 objects.

    Captions are distinct while the held-out set allows (it has only 18 one-object captions), then
    repeat in the same order; evaluation gives every image its own seed, so repeats are new samples.
    """
    return split_captions(count, "heldout", seed, objects)


def evaluation_captions(count: int) -> list[str]:
    """`count` held-out captions, half with one object and half with two: the prompts fidelity is measured on."""
    return heldout_captions(count // 2, objects=1) + heldout_captions(count - count // 2, objects=2)


def split_captions(count: int, split: str = "heldout", seed: int = 1234, objects: int | None = None, concept: str | None = None) -> list[str]:
    """`count` captions of the `train` or `heldout` combinations, as :func:`heldout_captions` picks them (with
    `concept`, captions that name that new shape: :func:`sample_concept_scene`).

    Judging a model on training captions as well tells what it failed to learn from what it failed
    to generalise.
    """
    distinct: list[str] = []
    for index in range(200 * count):
        scene = sample_scene(index, seed, split) if concept is None else sample_concept_scene(index, seed, split, concept)
        if (objects is None or len(scene.objects) == objects) and scene.caption not in distinct:
            distinct.append(scene.caption)
            if len(distinct) == count:
                break
    return [distinct[i % len(distinct)] for i in range(count)]
