"""Negative prompts to distil against: what CFG's unconditional half holds while a guide learns to follow it.

CFG with a negative prompt is `neg + w * (cond - neg)`: the negative takes the empty prompt's place. A guide
that reads the negative prompt (`GuideModel(reads_negative=True)`) is distilled against that teacher with a
negative drawn per sample: the empty prompt at rate 1 - `negative_rate` (so it keeps the fidelity of a
positive-only guide there), otherwise, in equal turns, another caption of the pool (a whole different
scene), a span of one or two content words of the sample's own prompt (a single attribute such as "red",
"circle" or "red circle": the negatives that fight the prompt, and the hardest ones for CFG too), and a line
of the user's `--negative-prompts FILE` when given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sources import read_prompt_file

# function words (and relation words, which name no attribute) that never start or end an attribute span
FUNCTION_WORDS = frozenset("a an the on of in at to with and or by from for is are above below left right under over beside near".split())
NEGATIVE_KINDS = ("caption", "attribute", "file")


def attribute_spans(prompt: str) -> list[str]:
    """The prompt's content words and pairs of neighbouring content words, the attribute negatives a prompt offers:
    "a red circle on a gray background" -> red, circle, gray, background, red circle, gray background."""
    words = [word.strip(".,;:!?\"'()").lower() for word in prompt.split()]
    content = [(i, word) for i, word in enumerate(words) if word and word not in FUNCTION_WORDS]
    singles = [word for _, word in content]
    pairs = [f"{a} {b}" for (i, a), (j, b) in zip(content, content[1:]) if j == i + 1]
    return singles + pairs


@dataclass
class NegativeSampler:
    """Draws one negative per training sample (see the module); seeded by the batch's generator, so a resumed run
    draws the same ones."""

    rate: float = 0.5  # share of samples with a non-empty negative
    file_prompts: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config) -> "NegativeSampler":
        file_prompts = tuple(read_prompt_file(config.negative_prompts)) if config.negative_prompts else ()
        return cls(config.negative_rate, file_prompts)

    def kinds(self) -> tuple[str, ...]:
        return NEGATIVE_KINDS if self.file_prompts else NEGATIVE_KINDS[:2]

    def draw(self, prompts: list[str], generator: torch.Generator) -> list[str]:
        """One negative per prompt ("" for the empty prompt). "caption" takes another prompt of the same batch
        (the next one that differs), which is a random caption of the pool since batches are random rows."""
        kinds = self.kinds()
        uniform = torch.rand(len(prompts), generator=generator).tolist()
        choices = torch.randint(len(kinds), (len(prompts),), generator=generator).tolist()
        picks = torch.randint(1 << 30, (len(prompts),), generator=generator).tolist()
        negatives = []
        for i, (prompt, u, choice, pick) in enumerate(zip(prompts, uniform, choices, picks)):
            if u >= self.rate:
                negatives.append("")
            elif kinds[choice] == "caption":
                negatives.append(_other_prompt(prompts, i))
            elif kinds[choice] == "attribute":
                spans = attribute_spans(prompt)
                negatives.append(spans[pick % len(spans)] if spans else "")
            else:
                negatives.append(self.file_prompts[pick % len(self.file_prompts)])
        return negatives


    def table(self, prompts: list[str]) -> list[str]:
        """Every negative `draw` can give for these prompts, "" first: what teacher runs recorded with negatives index
        (`negative_ids`), so a shard stores numbers, not strings."""
        spans = {span for prompt in prompts for span in attribute_spans(prompt)}
        return [""] + sorted((set(prompts) | spans | set(self.file_prompts)) - {""})


def _other_prompt(prompts: list[str], index: int) -> str:
    for offset in range(1, len(prompts)):
        other = prompts[(index + offset) % len(prompts)]
        if other != prompts[index]:
            return other
    return ""  # a batch of one prompt has no other: the empty negative


def check_negative_settings(negative_prompts: str | None, negative_rate: float) -> None:
    """One line for a missing or empty negatives file or a rate outside [0, 1], before anything loads."""
    if not 0.0 <= negative_rate <= 1.0:
        raise ValueError(f"negative_rate must be in [0, 1] (the share of samples with a non-empty negative), got {negative_rate}")
    if negative_prompts is not None:
        read_prompt_file(negative_prompts)
