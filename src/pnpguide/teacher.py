"""The classifier-free-guidance teacher and its guided student, behind one calling convention.

Both functions return the UNet's raw output (epsilon or v, whatever the scheduler's prediction_type),
so any diffusers scheduler can step with either, and training, evaluation and the pipelines all use
this one definition of CFG.
"""

from __future__ import annotations

import torch

from .guide import GuideModel


def cfg_combine(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, guidance_scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in diffusers' convention: `uncond + w * (cond - uncond)`.

    w = 1 gives the conditional prediction (no guidance); this w is Imagen's w and equals 1 + w of
    Ho & Salimans (2022), eq. 6. The other convention, `cond + w * (cond - uncond)`, is not used anywhere.
    A per-sample `guidance_scale` of shape (batch,) is broadcast over the other dimensions.
    """
    w = _per_sample(guidance_scale, noise_cond)
    return noise_uncond + w * (noise_cond - noise_uncond)


def _per_sample(guidance_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(guidance_scale, dtype=like.dtype, device=like.device)
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
    timestep = _batched(timestep, sample.shape[0], sample.device)
    output = unet(
        torch.cat([sample, sample]),
        torch.cat([timestep, timestep]),
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
        added_cond_kwargs=added_cond_kwargs,
        cross_attention_kwargs=cross_attention_kwargs,
        return_dict=False,
    )[0]
    noise_uncond, noise_cond = output.chunk(2)
    return cfg_combine(noise_uncond, noise_cond, guidance_scale)


def guided_noise_pred(
    unet,
    guide: GuideModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    prompt_embeds: torch.Tensor,
    guidance_scale: torch.Tensor | float,
    added_cond_kwargs: dict | None = None,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """The student: one UNet call at batch B whose skip connections receive the guide's residuals."""
    timestep = _batched(timestep, sample.shape[0], sample.device)
    residuals = guide(sample, timestep, prompt_embeds, guidance_scale, added_cond_kwargs=added_cond_kwargs)
    expected = _expected_residuals(unet)
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


def _expected_residuals(unet) -> int:
    blocks = len(unet.config.block_out_channels)
    return 1 + blocks * unet.config.layers_per_block + (blocks - 1)


def _batched(timestep: torch.Tensor | int, batch: int, device) -> torch.Tensor:
    return torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)

