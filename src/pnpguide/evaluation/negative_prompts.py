"""Negative prompts in `pnpguide eval`: one per image, batched for sampling and replays, and the avoidance rate.

CFG puts the negative prompt where the empty one would be; a guide must reproduce that to be a drop-in. The
evaluation therefore measures every method against CFG *with the same negative*, and, on the shapes world,
how often the thing a negative names still appears (the analytic judge can see colours and shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..conditioning import Conditioning
from ..sources import read_prompt_file

if TYPE_CHECKING:
    from ..embedded.adherence import DetectedObject

CAPTION_ATTRIBUTES = "caption-attributes"  # built-in negatives: an attribute of each caption's first object


def eval_negatives(spec: str | None, prompts: list[str]) -> list[str] | None:
    """One negative prompt per prompt: a file's lines cycled, or `caption-attributes`; None without negatives.
    Raises a one-line ValueError for a missing or empty file, or caption-attributes on non-shapes prompts."""
    if spec is None:
        return None
    if spec == CAPTION_ATTRIBUTES:
        return caption_attribute_negatives(prompts)
    try:
        negatives = read_prompt_file(spec)
    except (OSError, ValueError) as error:
        raise ValueError(f"--negative-prompts: {error} (give a text file, one negative prompt per line, or {CAPTION_ATTRIBUTES!r})") from None
    return [negatives[i % len(negatives)] for i in range(len(prompts))]


def caption_attribute_negatives(prompts: list[str]) -> list[str]:
    """For prompt i, its first object's colour, shape or coloured shape in turns (i % 3): negatives that contradict
    the prompt, so whether a method obeys them shows in every image."""
    from ..embedded.adherence import parse_caption

    negatives = []
    for i, prompt in enumerate(prompts):
        try:
            first = parse_caption(prompt).objects[0]
        except ValueError:
            raise ValueError(f"--negative-prompts {CAPTION_ATTRIBUTES} needs shapes captions as prompts, and {prompt!r} is not one; "
                             "give a negative prompt file instead") from None
        negatives.append((first.colour, first.shape, f"{first.colour} {first.shape}")[i % 3])
    return negatives


@dataclass(frozen=True)
class NegatedAttribute:
    """What a negative prompt names that the judge can see: a colour, a shape, or both (a coloured shape)."""

    colour: str | None
    shape: str | None

    def appears_in(self, objects: list[DetectedObject]) -> bool:
        return any(self.colour in (None, o.colour) and self.shape in (None, o.shape) for o in objects)


def parse_negative(text: str) -> NegatedAttribute | None:
    """'red', 'circle(s)', '(a) red circle(s)'; None for any other phrase (not measurable)."""
    from ..embedded import shapes

    words = text.strip().lower().split()
    words = words[1:] if words[:1] in (["a"], ["an"]) else words
    if words and words[-1].endswith("s") and words[-1][:-1] in shapes.SHAPES:
        words[-1] = words[-1][:-1]
    if len(words) == 1 and (words[0] in shapes.COLOURS or words[0] in shapes.SHAPES):
        colour = words[0] if words[0] in shapes.COLOURS else None
        return NegatedAttribute(colour, None if colour else words[0])
    if len(words) == 2 and words[0] in shapes.COLOURS and words[1] in shapes.SHAPES:
        return NegatedAttribute(words[0], words[1])
    return None


def measurable(negatives: list[str]) -> int:
    """How many of the negatives the judge can check."""
    return sum(parse_negative(n) is not None for n in negatives)


def avoidance_rate(images: list[Image.Image], negatives: list[str], style: str = "flat") -> float | None:
    """Share of images in which no detected object shows what the image's negative names, over the images whose
    negative is measurable; None if none is."""
    from ..embedded.adherence import detect

    avoided = [
        not attribute.appears_in(detect(image, style)[1])
        for image, attribute in zip(images, map(parse_negative, negatives))
        if attribute is not None
    ]
    return float(np.mean(avoided)) if avoided else None


def batch_rows(negative: Conditioning, start: int, stop: int) -> Conditioning:
    """Rows start:stop of a per-image conditioning; a one-row conditioning (the empty negative) serves any batch."""
    return negative.expand(stop - start) if len(negative) == 1 else _select(negative, slice(start, stop))


def pipeline_kwargs(negative: Conditioning) -> dict:
    """The pipeline's negative arguments for a batch: its embeddings (and SDXL's pooled one), so sampling and the
    replays at the teacher's states use the very same tensors."""
    kwargs = {"negative_prompt_embeds": negative.prompt_embeds}
    if negative.text_embeds is not None:
        kwargs["negative_pooled_prompt_embeds"] = negative.text_embeds
    return kwargs


def _select(conditioning: Conditioning, rows) -> Conditioning:
    return Conditioning(*(None if x is None else x[rows] for x in (conditioning.prompt_embeds, conditioning.text_embeds, conditioning.time_ids)))
