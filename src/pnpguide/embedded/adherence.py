"""Prompt adherence: does an image show what its shapes caption says?

Analytic, not learned: segment the background by its border colour, label the remaining connected
components, and read each one's colour (nearest palette entry of the style), shape (how much of its
bounding box it fills: square 1.0, circle pi/4, triangle 1/2), size and position. An analytic
judge cannot be fooled by the diffusion model's own biases the way a CNN trained on the same data
can, and its rules can be read in one screen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from . import shapes

CAPTION_PATTERN = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour1>\w+) (?P<shape1>\w+)"
    r"(?: (?P<relation>above|below|left of|right of) an? (?P<colour2>\w+) (?P<shape2>\w+))?"
    r" on an? (?P<background>\w+) background$"
)
MIN_OBJECT_AREA = 30  # pixels of a 64x64 image; smaller blobs are noise, not objects
SIZE_THRESHOLD = 25.0  # bounding-box extent in pixels separating "small" (14-22) from "large" (30-40)
RELATION_MARGIN = 6.0  # centroids must differ by this many pixels along the relation's axis
# RGB distance from the background colour that counts as foreground: below the closest object/background
# pair of each style (pastel purple on pastel gray: 60; others: 108), above the textured style's stripes (~50)
FOREGROUND_DISTANCE = {"flat": 48.0, "outline": 48.0, "pastel": 40.0, "textured": 75.0}
# A new shape (shapes.NEW_SHAPES) is only looked for where it can be meant: when the caption names it, or when the judge
# is told the model draws it (`new_shapes`, a fine-tune that learnt it). Verdicts on the base's captions without it are
# those of the three-shape judge, to the bit.
BAR_ASPECT = 1.5  # a bar's bounding box is 3x as wide as tall (1.8 or more in 95% of VAE reconstructions); base shapes' ~1


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    objects: tuple[ObjectSpec, ...]
    relation: str | None
    background: str


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    center: tuple[float, float]  # (x, y) pixels
    extent: float  # largest side of the bounding box, pixels
    fill_ratio: float  # filled area / bounding-box area

    @property
    def size(self) -> str:
        return "small" if self.extent < SIZE_THRESHOLD else "large"


FAILURE_KINDS = ("background", "count", "attributes", "relation")  # in the order the judge checks them


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # "ok" or what did not match, for reports and debugging
    kind: str = "ok"  # "ok" or the first check that failed, one of FAILURE_KINDS


def parse_caption(caption: str) -> CaptionSpec:
    """Parse a shapes-dataset caption; raise ValueError for anything else."""
    match = CAPTION_PATTERN.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"not a shapes caption: {caption!r} (expected e.g. 'a red circle above a blue square on a black background')")
    parts = match.groupdict()
    objects = [ObjectSpec(parts["colour1"], parts["shape1"], parts["size"])]
    if parts["relation"]:
        objects.append(ObjectSpec(parts["colour2"], parts["shape2"]))
    for spec in objects:
        if spec.colour not in shapes.COLOURS or spec.shape not in shapes.SHAPES + shapes.NEW_SHAPES:
            raise ValueError(f"unknown colour or shape in {caption!r}: {spec.colour!r} {spec.shape!r}")
    if parts["background"] not in shapes.BACKGROUNDS:
        raise ValueError(f"unknown background {parts['background']!r} in {caption!r}")
    return CaptionSpec(tuple(objects), parts["relation"], parts["background"])


def _palette(names: dict[str, tuple[int, int, int]], style: str) -> tuple[list[str], np.ndarray]:
    return list(names), np.array([shapes.style_colour(rgb, style) for rgb in names.values()], dtype=np.float64)


def _nearest(colour: np.ndarray, palette: tuple[list[str], np.ndarray]) -> str:
    names, values = palette
    return names[int(np.argmin(np.linalg.norm(values - colour, axis=1)))]


def _classify_shape(filled: np.ndarray, fill_ratio: float, vocabulary: tuple[str, ...] = shapes.SHAPES) -> str:
    """Triangles point up: their top third holds far fewer pixels than their bottom third. A bar (when `vocabulary`
    has it) is much wider than tall."""
    rows = np.nonzero(filled.any(axis=1))[0]
    if "bar" in vocabulary:
        columns = np.nonzero(filled.any(axis=0))[0]
        if len(columns) >= BAR_ASPECT * len(rows):
            return "bar"
    third = max(len(rows) // 3, 1)
    top, bottom = filled[rows[:third]].sum(), filled[rows[-third:]].sum()
    if top < 0.6 * bottom:
        return "triangle"
    return "square" if fill_ratio > 0.88 else "circle"


def vocabulary_for(spec: CaptionSpec | None = None, new_shapes: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The shapes the judge tells apart: the base's, plus each new shape the caption names or `new_shapes` lists."""
    named = [o.shape for o in spec.objects] if spec is not None else []
    return shapes.SHAPES + tuple(s for s in shapes.NEW_SHAPES if s in named or s in new_shapes)


def detect(image: Image.Image, style: str = "flat", vocabulary: tuple[str, ...] = shapes.SHAPES) -> tuple[str, list[DetectedObject]]:
    """Return the background name and the objects found in a 64x64 image of `style`, shapes named from `vocabulary`."""
    shapes.check_style(style)
    pixels = ndimage.median_filter(np.asarray(image.convert("RGB"), dtype=np.float64), size=(3, 3, 1))
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3), pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = _nearest(background_rgb, _palette(shapes.BACKGROUNDS, style))
    foreground = np.linalg.norm(pixels - background_rgb, axis=2) > FOREGROUND_DISTANCE[style]
    foreground = ndimage.binary_closing(foreground, structure=np.ones((3, 3)))  # mend ragged, noisy edges
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    colours = _palette(shapes.COLOURS, style)
    objects = []
    for index in range(1, count + 1):
        stroke = labels == index
        filled = ndimage.binary_fill_holes(stroke)  # outline style: the inside counts as the object
        if filled.sum() < MIN_OBJECT_AREA:
            continue
        ys, xs = np.nonzero(filled)
        height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
        fill_ratio = filled.sum() / (height * width)
        colour = _nearest(np.median(pixels[stroke], axis=0), colours)
        objects.append(DetectedObject(colour, _classify_shape(filled, fill_ratio, vocabulary), (xs.mean(), ys.mean()), float(max(height, width)), float(fill_ratio)))
    return background, objects


def _matches(found: DetectedObject, spec: ObjectSpec) -> bool:
    return found.colour == spec.colour and found.shape == spec.shape and spec.size in (None, found.size)


def _relation_holds(first: DetectedObject, second: DetectedObject, relation: str) -> bool:
    dx, dy = second.center[0] - first.center[0], second.center[1] - first.center[1]
    along = {"above": dy, "below": -dy, "left of": dx, "right of": -dx}[relation]
    return along > RELATION_MARGIN


def judge(image: Image.Image, caption: str, style: str = "flat", new_shapes: tuple[str, ...] = ()) -> Verdict:
    """Decide whether `image` satisfies `caption`: background, object count, attributes, relation. `new_shapes`: the new
    shapes (shapes.NEW_SHAPES) the model has learnt to draw, so that one drawn for another caption is not taken for a
    base shape (a bar for a square); a shape the caption names is always looked for."""
    spec = parse_caption(caption)
    background, found = detect(image, style, vocabulary_for(spec, new_shapes))
    if background != spec.background:
        return Verdict(False, f"background is {background}, wanted {spec.background}", "background")
    if len(found) != len(spec.objects):
        return Verdict(False, f"found {len(found)} objects, wanted {len(spec.objects)}", "count")
    for order in ([0],) if len(found) == 1 else ([0, 1], [1, 0]):
        chosen = [found[i] for i in order]
        if all(_matches(f, s) for f, s in zip(chosen, spec.objects)):
            if spec.relation is None or _relation_holds(chosen[0], chosen[1], spec.relation):
                return Verdict(True, "ok")
            return Verdict(False, f"objects found but not '{spec.relation}'", "relation")
    described = ", ".join(f"{o.size} {o.colour} {o.shape}" for o in found)
    return Verdict(False, f"found {described}", "attributes")


def adherence(images: list[Image.Image], captions: list[str], style: str = "flat", new_shapes: tuple[str, ...] = ()) -> float:
    """Fraction of images that satisfy their captions."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return failure_counts(images, captions, style, new_shapes)["ok"] / max(len(images), 1)


def failure_counts(images: list[Image.Image], captions: list[str], style: str = "flat", new_shapes: tuple[str, ...] = ()) -> dict[str, int]:
    """How many images pass ("ok") and how many fail at each check, in FAILURE_KINDS order."""
    counts = dict.fromkeys(("ok",) + FAILURE_KINDS, 0)
    for image, caption in zip(images, captions, strict=True):
        counts[judge(image, caption, style, new_shapes).kind] += 1
    return counts


def relation_accuracy(counts: dict[str, int]) -> float | None:
    """Of the images that drew both named objects right, the fraction with the relation right too.

    Two-object adherence multiplies drawing the objects by placing them; this separates the two, and
    0.5 means the model places the first-named object on the wrong side as often as on the right one.
    """
    placed = counts["ok"] + counts["relation"]
    return counts["ok"] / placed if placed else None


def _wrong_caption(scene: shapes.Scene, rng: np.random.Generator, new_shapes: tuple[str, ...] = ()) -> str:
    """The scene's caption with one attribute changed: what a judge must reject (a shape changed among the base's and
    `new_shapes`)."""
    objects = list(scene.objects)
    background, relation = scene.background, scene.relation
    what = rng.choice(["colour", "shape", "background"] + (["relation"] if relation else []))
    first = objects[0]
    if what == "colour":
        taken = {o.colour for o in objects}
        objects[0] = shapes.ShapeObject(first.shape, str(rng.choice([c for c in shapes.COLOURS if c not in taken])), first.center, first.extent, first.size)
    elif what == "shape":
        objects[0] = shapes.ShapeObject(str(rng.choice([s for s in shapes.SHAPES + new_shapes if s != first.shape])), first.colour, first.center, first.extent, first.size)
    elif what == "background":
        background = str(rng.choice([b for b in shapes.BACKGROUNDS if b != background]))
    else:
        relation = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}[relation]
    return shapes.caption_for(shapes.Scene(tuple(objects), background, relation, scene.mention_size))


@dataclass(frozen=True)
class JudgeAccuracy:
    style: str
    images: int
    accepts_true_captions: float  # fraction of real images judged to match their own caption
    rejects_wrong_captions: float  # fraction judged not to match a caption with one attribute changed

    @property
    def accuracy(self) -> float:
        return (self.accepts_true_captions + self.rejects_wrong_captions) / 2


def judge_accuracy(style: str, images: int = 500, seed: int = 99, split: str = "heldout", concept: str | None = None,
                   new_shapes: tuple[str, ...] = ()) -> JudgeAccuracy:
    """Measure the judge on real dataset images of one style (true and one-attribute-wrong captions). With `concept`
    (one of shapes.NEW_SHAPES), on scenes that show it (shapes.sample_concept_scene), a wrong shape drawn from the base's
    and the concept; `new_shapes`: judge as for a model that draws these (see :func:`judge`)."""
    rng = np.random.default_rng(seed)
    new_shapes = tuple(dict.fromkeys(new_shapes + ((concept,) if concept else ())))
    accepted = rejected = 0
    for index in range(images):
        scene = shapes.sample_scene(index, seed, split) if concept is None else shapes.sample_concept_scene(index, seed, split, concept)
        image = shapes.render(scene, style, noise_seed=index)
        accepted += judge(image, scene.caption, style, new_shapes).ok
        rejected += not judge(image, _wrong_caption(scene, rng, new_shapes if concept else ()), style, new_shapes).ok
    return JudgeAccuracy(style, images, accepted / images, rejected / images)
