"""The classifier-free-guidance teacher and its guided student, behind one calling convention.

Both functions return the UNet's raw output (epsilon or v, whatever the scheduler's prediction_type),
so any diffusers scheduler can step with either, and training, evaluation and the pipelines all use
this one definition of CFG.
"""

from __future__ import annotations

import torch

from .guide import GuideModel, GuideOutput, UNetFeatures, per_sample


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
    timestep = _batched(timestep, sample.shape[0], sample.device)
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
    guide: GuideModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    prompt_embeds: torch.Tensor,
    guidance_scale: torch.Tensor | float,
    added_cond_kwargs: dict | None = None,
    cross_attention_kwargs: dict | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The student: one UNet call at batch B whose skip connections receive the guide's residuals, or (a guide
    that reads the UNet's output) whose output the guide then corrects.

    A guide that reads the UNet's own features is called from inside that one call, once the UNet's encoder
    has run (see :class:`FeatureTap`); any other guide runs first and its residuals are passed
    through diffusers' ControlNet arguments. Both add the residuals at the same places.
    `negative_prompt_embeds` (B or 1 rows) reach a guide that reads the negative prompt; the UNet never sees them.
    `negative_rows` ((B,) bool, None: all): the rows that have a negative prompt, for an output guide's negative head."""
    timestep = _batched(timestep, sample.shape[0], sample.device)
    unwrapped = getattr(guide, "module", guide)  # under data parallelism the guide arrives wrapped in DDP
    if unwrapped.reads_unet_output:
        output = unet(sample, timestep, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs,
                      cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
        return output_guided(guide, output, sample, timestep, prompt_embeds, guidance_scale, negative_prompt_embeds, negative_rows)
    if unwrapped.reads_unet_features:
        tap = feature_tap(unet)
        tap.start(guide, sample, timestep, prompt_embeds, guidance_scale, negative_prompt_embeds)
        try:
            return unet(
                sample,
                timestep,
                encoder_hidden_states=prompt_embeds,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )[0]
        finally:
            tap.stop()
    residuals = guide(sample, timestep, prompt_embeds, guidance_scale, added_cond_kwargs=added_cond_kwargs,
                      negative_encoder_hidden_states=negative_prompt_embeds)
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


def output_guided(guide, conditional: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                  guidance_scale: torch.Tensor | float, negative_prompt_embeds: torch.Tensor | None = None,
                  negative_rows: torch.Tensor | None = None) -> torch.Tensor:
    """An output guide's step from the UNet's conditional output: `cond + (w - 1) * predicted (cond - uncond)`, CFG with
    the unconditional pass predicted. Training passes the conditional half of the teacher's own call here, so the
    student needs no UNet call of its own."""
    correction = guide(sample, timestep, prompt_embeds, guidance_scale, unet_output=conditional, negative_encoder_hidden_states=negative_prompt_embeds,
                       negative_rows=negative_rows)
    return conditional + correction.sample.to(conditional.dtype)


class FeatureTap:
    """Hooks that let a guide read the UNet's encoder inside its forward and correct its decoder.

    In UNet2DConditionModel the skip connections and the mid-block output are not changed by the ControlNet
    residuals until after the mid block, so they can be read first: conv_in and each down block record
    their outputs, the mid block's hook computes the residuals from them and adds the mid one (where
    diffusers adds `mid_block_additional_residual`), and each up block adds the skip residuals to the
    `res_hidden_states_tuple` it receives (where diffusers adds `down_block_additional_residuals`).

    The hooks are registered once per UNet (:func:`feature_tap`) and do nothing while no guide is set, so a
    UNet + guide step can be traced by `torch.compile(fullgraph=True)`: registering hooks inside the traced
    step would be a graph break, while setting this object's attributes is not."""

    def __init__(self, unet):
        self.guide = None
        self.inputs: tuple = ()
        self.skips: list[torch.Tensor] = []
        self.residuals: GuideOutput | None = None
        unet.conv_in.register_forward_hook(self._record_one)
        for block in unet.down_blocks:
            block.register_forward_hook(self._record_block)
        unet.mid_block.register_forward_hook(self._add_mid)
        end = _expected_residuals(unet)
        for block in unet.up_blocks:  # each up block takes the last len(resnets) of the remaining skips
            block.register_forward_pre_hook(_SkipAdder(self, end - len(block.resnets), end), with_kwargs=True)
            end -= len(block.resnets)

    def start(self, guide, sample, timestep, prompt_embeds, guidance_scale, negative_prompt_embeds=None) -> None:
        self.guide, self.skips, self.residuals = guide, [], None
        self.inputs = (sample, timestep, prompt_embeds, guidance_scale, negative_prompt_embeds)

    def stop(self) -> None:
        self.guide, self.inputs, self.skips, self.residuals = None, (), [], None

    def _record_one(self, module, args, output):
        if self.guide is not None:
            self.skips.append(output)

    def _record_block(self, module, args, output):
        if self.guide is not None:
            self.skips.extend(output[1])

    def _add_mid(self, module, args, output):
        if self.guide is None:
            return output
        sample, timestep, prompt_embeds, guidance_scale, negative_prompt_embeds = self.inputs
        features = UNetFeatures(tuple(self.skips), output)  # the guide checks it got one feature per head
        self.residuals = self.guide(sample, timestep, prompt_embeds, guidance_scale, unet_features=features,
                                    negative_encoder_hidden_states=negative_prompt_embeds)
        return output + self.residuals.mid_block_additional_residual.to(output.dtype)


class _SkipAdder:
    """An up block's pre-hook: adds the guide's residuals for skips [first, last) to the ones it receives."""

    def __init__(self, tap: FeatureTap, first: int, last: int):
        self.tap, self.first, self.last = tap, first, last

    def __call__(self, module, args, kwargs):
        if self.tap.guide is None:
            return None
        added = self.tap.residuals.down_block_additional_residuals[self.first : self.last]
        kwargs["res_hidden_states_tuple"] = tuple(s + r.to(s.dtype) for s, r in zip(kwargs["res_hidden_states_tuple"], added, strict=True))
        return args, kwargs


def feature_tap(unet) -> FeatureTap:
    """The UNet's :class:`FeatureTap`, registered on first use. Under `torch.compile`, make that first use eager
    (one eager step, or call this function before compiling): hooks cannot be registered inside a traced graph."""
    tap = getattr(unet, "_pnpguide_feature_tap", None)
    if tap is None:
        tap = FeatureTap(unet)
        object.__setattr__(unet, "_pnpguide_feature_tap", tap)  # a plain attribute, not a submodule: never saved
    return tap


def _expected_residuals(unet) -> int:
    blocks = len(unet.config.block_out_channels)
    return 1 + blocks * unet.config.layers_per_block + (blocks - 1)


def _batched(timestep: torch.Tensor | int, batch: int, device) -> torch.Tensor:
    return per_sample(timestep, batch, device)

