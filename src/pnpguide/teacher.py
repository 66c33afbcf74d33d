"""The classifier-free-guidance teacher and its guided student, behind one calling convention.

Both functions return the UNet's raw output (epsilon or v, whatever the scheduler's prediction_type),
so any diffusers scheduler can step with either, and training, evaluation and the pipelines all use
this one definition of CFG.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from .guide import GuideModel, GuideOutput, UNetFeatures


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
    return cfg_combine(noise_uncond, noise_cond, guidance_scale), noise_cond


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
    """The student: one UNet call at batch B whose skip connections receive the guide's residuals.

    A guide that reads the UNet's own features is called from inside that one call, once the UNet's encoder
    has run (see :func:`_residuals_from_encoder`); any other guide runs first and its residuals are passed
    through diffusers' ControlNet arguments. Both add the residuals at the same places."""
    timestep = _batched(timestep, sample.shape[0], sample.device)
    if getattr(guide, "module", guide).reads_unet_features:  # under data parallelism the guide arrives wrapped in DDP
        compute = lambda features: guide(sample, timestep, prompt_embeds, guidance_scale, unet_features=features)  # noqa: E731
        with _residuals_from_encoder(unet, compute):
            return unet(
                sample,
                timestep,
                encoder_hidden_states=prompt_embeds,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )[0]
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


@contextmanager
def _residuals_from_encoder(unet, compute: Callable[[UNetFeatures], GuideOutput]):
    """Hooks that let a guide read the UNet's encoder inside its forward and correct its decoder.

    In UNet2DConditionModel the skip connections and the mid-block output are not changed by the ControlNet
    residuals until after the mid block, so they can be read first: conv_in and each down block record
    their outputs, the mid block's hook computes the residuals from them and adds the mid one (where
    diffusers adds `mid_block_additional_residual`), and each up block adds the skip residuals to the
    `res_hidden_states_tuple` it receives (where diffusers adds `down_block_additional_residuals`)."""
    skips: list[torch.Tensor] = []
    residuals: list[GuideOutput] = []

    def mid_hook(module, args, output):
        residuals.append(compute(UNetFeatures(tuple(skips), output)))  # the guide checks it got one feature per head
        return output + residuals[0].mid_block_additional_residual.to(output.dtype)

    def up_hook(first: int, last: int):
        def hook(module, args, kwargs):
            added = residuals[0].down_block_additional_residuals[first:last]
            kwargs["res_hidden_states_tuple"] = tuple(s + r.to(s.dtype) for s, r in zip(kwargs["res_hidden_states_tuple"], added, strict=True))
            return args, kwargs

        return hook

    handles = [unet.conv_in.register_forward_hook(lambda module, args, output: skips.append(output))]
    handles += [block.register_forward_hook(lambda module, args, output: skips.extend(output[1])) for block in unet.down_blocks]
    handles.append(unet.mid_block.register_forward_hook(mid_hook))
    end = _expected_residuals(unet)
    for block in unet.up_blocks:  # each up block takes the last len(resnets) of the remaining skips
        handles.append(block.register_forward_pre_hook(up_hook(end - len(block.resnets), end), with_kwargs=True))
        end -= len(block.resnets)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _expected_residuals(unet) -> int:
    blocks = len(unet.config.block_out_channels)
    return 1 + blocks * unet.config.layers_per_block + (blocks - 1)


def _batched(timestep: torch.Tensor | int, batch: int, device) -> torch.Tensor:
    return torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)

