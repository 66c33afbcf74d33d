"""The classifier-free-guidance teacher and its guided student, behind one calling convention.

Both functions return the UNet's raw output (epsilon or v, whatever the scheduler's prediction_type),
so any diffusers scheduler can step with either, and training, evaluation and the pipelines all use
this one definition of CFG.
"""

from __future__ import annotations

import torch

from .guides import OutputGuide
from .guides.base import per_sample


def cfg_combine(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, guidance_scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in diffusers' convention: `uncond + w * (cond - uncond)`.

    w = 1 gives the conditional prediction (no guidance); this w is Imagen's w and equals 1 + w of
    Ho & Salimans (2022), eq. 6. The other convention, `cond + w * (cond - uncond)`, is not used anywhere.
    A per-sample `guidance_scale` of shape (batch,) is broadcast over the other dimensions.
    """
    w = _per_sample(guidance_scale, noise_cond)
    return noise_uncond + w * (noise_cond - noise_uncond)


def _per_sample(guidance_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if not isinstance(guidance_scale, torch.Tensor):  # a Python number multiplies as it is: no host-to-device copy
        return float(guidance_scale)
    w = guidance_scale.to(dtype=like.dtype, device=like.device)
    return w.reshape(-1, *([1] * (like.ndim - 1))) if w.ndim == 1 else w


def cfg_noise_pred(
    unet,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: torch.Tensor | float,
    added_cond_kwargs: dict | None = None,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """The teacher: one UNet call on a 2B batch [uncond; cond], combined by :func:`cfg_combine`.

    sample: (B, C, h, w); prompt_embeds, negative_prompt_embeds: (B, tokens, dim). Batched the way
    StableDiffusionPipeline batches it, so the teacher reproduces diffusers' CFG images exactly.
    SDXL-style `added_cond_kwargs` must hold 2B rows, [uncond; cond], as SDXL's pipeline builds them.
    """
    return cfg_and_conditional(unet, sample, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale, added_cond_kwargs, cross_attention_kwargs)[0]


def cfg_and_conditional(
    unet,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: torch.Tensor | float,
    added_cond_kwargs: dict | None = None,
    cross_attention_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CFG output, conditional output) from the teacher's one 2B call: the distance between the two is the
    gap the guide has to close, which the relative distillation loss divides by."""
    noise_uncond, noise_cond = unconditional_and_conditional(unet, sample, timestep, prompt_embeds, negative_prompt_embeds,
                                                             added_cond_kwargs, cross_attention_kwargs)
    return cfg_combine(noise_uncond, noise_cond, guidance_scale), noise_cond


def unconditional_and_conditional(
    unet,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    added_cond_kwargs: dict | None = None,
    cross_attention_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's two outputs from one 2B call [uncond; cond], before they are combined: what teacher
    trajectories record with each state, so that training at that state needs no teacher call of its own."""
    timestep = per_sample(timestep, sample.shape[0], sample.device)
    output = unet(
        torch.cat([sample, sample]),
        torch.cat([timestep, timestep]),
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
        added_cond_kwargs=added_cond_kwargs,
        cross_attention_kwargs=cross_attention_kwargs,
        return_dict=False,
    )[0]
    return tuple(output.chunk(2))


def guided_noise_pred(
    unet,
    guide,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    prompt_embeds: torch.Tensor,
    guidance_scale: torch.Tensor | float,
    added_cond_kwargs: dict | None = None,
    cross_attention_kwargs: dict | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The student: one UNet call at batch B, whose output an output guide then corrects, or whose skip connections
    receive a residual guide's residuals (through diffusers' ControlNet arguments).

    `negative_prompt_embeds` (B or 1 rows) and `negative_rows` ((B,) bool, None: all) reach an output guide's negative
    head; the UNet never sees them."""
    timestep = per_sample(timestep, sample.shape[0], sample.device)
    design = getattr(guide, "module", guide)  # under data parallelism the guide arrives wrapped in DDP
    if isinstance(design, OutputGuide):
        output = unet(sample, timestep, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs,
                      cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
        return output_guided(guide, output, sample, timestep, prompt_embeds, guidance_scale, negative_prompt_embeds, negative_rows)
    residuals = guide(sample, timestep, prompt_embeds, guidance_scale, added_cond_kwargs=added_cond_kwargs)
    expected = expected_residuals(unet)
    if len(residuals.down_block_additional_residuals) != expected:  # diffusers would silently zip-truncate
        raise ValueError(f"the guide returns {len(residuals.down_block_additional_residuals)} residuals, this UNet takes {expected}")
    return unet(
        sample,
        timestep,
        encoder_hidden_states=prompt_embeds,
        down_block_additional_residuals=[r.to(sample.dtype) for r in residuals.down_block_additional_residuals],
        mid_block_additional_residual=residuals.mid_block_additional_residual.to(sample.dtype),
        added_cond_kwargs=added_cond_kwargs,
        cross_attention_kwargs=cross_attention_kwargs,
        return_dict=False,
    )[0]


def output_guided(guide, conditional: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                  guidance_scale: torch.Tensor | float, negative_prompt_embeds: torch.Tensor | None = None,
                  negative_rows: torch.Tensor | None = None) -> torch.Tensor:
    """An output guide's step from the UNet's conditional output: `cond + (w - 1) * predicted (cond - uncond)`, CFG with
    the unconditional pass predicted. Training passes the conditional half of the teacher's own call here, so the
    student needs no UNet call of its own."""
    correction = guide(sample, timestep, prompt_embeds, guidance_scale, unet_output=conditional,
                       negative_encoder_hidden_states=negative_prompt_embeds, negative_rows=negative_rows)
    return conditional + correction.sample.to(conditional.dtype)


def expected_residuals(unet) -> int:
    """How many skip-connection residuals a UNet takes: conv_in, then each resnet and downsampler of its encoder."""
    blocks = len(unet.config.block_out_channels)
    return 1 + blocks * unet.config.layers_per_block + (blocks - 1)
