"""Prompt conditioning exactly as the base's own pipeline computes it, for SD and SDXL alike.

SD conditions its UNet on one text encoder's token embeddings; SDXL on two encoders' concatenated token
embeddings plus, through `added_cond_kwargs`, the second encoder's pooled embedding (`text_embeds`) and six
size/crop numbers (`time_ids`). Training calls diffusers' own `pipe.encode_prompt` and `_get_add_time_ids`
through :func:`encode_prompts`, so teacher and student see what sampling will feed them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """What a batch of prompts gives the UNet; SD leaves the two SDXL fields None."""

    prompt_embeds: torch.Tensor  # (B, tokens, dim); SDXL: both encoders' token embeddings, concatenated
    text_embeds: torch.Tensor | None = None  # SDXL: (B, projection_dim) pooled embedding of the second encoder
    time_ids: torch.Tensor | None = None  # SDXL: (B, 6) original size, crop top-left, target size

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def expand(self, batch: int) -> "Conditioning":
        """A one-row conditioning (the negative prompt) repeated to `batch` rows, without copying."""
        return self._map(lambda x: x.expand(batch, *x.shape[1:]))

    def rows_for(self, batch: int) -> "Conditioning":
        """This conditioning for `batch` rows: one row (the empty negative) repeated, or these rows as they are."""
        return self.expand(batch) if len(self) == 1 else self

    def to(self, device, dtype: torch.dtype | None = None) -> "Conditioning":
        return self._map(lambda x: x.to(device=device, dtype=dtype))

    def added_cond_kwargs(self) -> dict | None:
        """The UNet's `added_cond_kwargs` for these rows (None for SD)."""
        if self.text_embeds is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}

    def _map(self, function) -> "Conditioning":
        return Conditioning(*(None if x is None else function(x) for x in dataclasses.astuple(self)))


def cfg_added_cond_kwargs(conditioning: Conditioning, negative: Conditioning) -> dict | None:
    """The teacher's `added_cond_kwargs`: 2B rows, [uncond; cond], as `cfg_noise_pred` batches its call."""
    if conditioning.text_embeds is None:
        return None
    negative = negative.rows_for(len(conditioning))
    return {name: torch.cat([negative.added_cond_kwargs()[name], value]) for name, value in conditioning.added_cond_kwargs().items()}


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, resolution: int) -> Conditioning:
    """(len(prompts), ...) conditioning for square images of `resolution` pixels (SDXL's time ids need it)."""
    if not is_sdxl(pipe):
        embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
        return Conditioning(embeds.float())
    embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False)
    return Conditioning(embeds.float(), pooled.float(), _time_ids(pipe, resolution, len(prompts), device))


@torch.no_grad()
def encode_negative(pipe, device, resolution: int) -> Conditioning:
    """One row: the unconditional branch of CFG as the pipeline builds it with no negative prompt (SD: the
    empty prompt's embedding; SDXL with `force_zeros_for_empty_prompt`: zeros)."""
    if not is_sdxl(pipe):
        _, negative = pipe.encode_prompt([""], device, 1, True)
        return Conditioning(negative.float())
    _, negative, _, negative_pooled = pipe.encode_prompt([""], device=device, do_classifier_free_guidance=True)
    return Conditioning(negative.float(), negative_pooled.float(), _time_ids(pipe, resolution, 1, device))


@torch.no_grad()
def encode_negatives(pipe, negatives: list[str], default: Conditioning, device, resolution: int) -> Conditioning:
    """(len(negatives), ...) conditioning for CFG's unconditional half, one negative prompt per row; rows with the
    empty negative take `default` (:func:`encode_negative`), as the pipeline does without a negative prompt (SDXL: zeros)."""
    encoded = encode_prompts(pipe, [negative or "" for negative in negatives], device, resolution)
    empty = torch.tensor([not negative for negative in negatives], device=device)
    if not empty.any():
        return encoded
    choose = lambda mine, fallback: torch.where(empty.view(-1, *[1] * (mine.ndim - 1)), fallback.to(mine.dtype), mine)  # noqa: E731
    return Conditioning(*(None if x is None else choose(x, d) for x, d in zip(dataclasses.astuple(encoded), dataclasses.astuple(default))))


def _time_ids(pipe, resolution: int, batch: int, device) -> torch.Tensor:
    """(batch, 6): original size = target size = the training resolution, crop (0, 0), as SDXL samples by default."""
    size = (resolution, resolution)
    projection_dim = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=projection_dim)
    return time_ids.to(device).expand(batch, -1)
