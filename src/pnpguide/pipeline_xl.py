"""PlugAndPlayXLPipeline: SDXL with a guide. The twin of :class:`pnpguide.PlugAndPlayPipeline`: the same modes, policy and
denoising loop (:class:`GuidedSamplingMixin`), with SDXL's conditioning: two text encoders, the pooled prompt embedding
and the size/crop ids, passed to the UNet (and a residual guide) as `added_cond_kwargs`. A drop-in for diffusers'
`StableDiffusionXLPipeline`: `__call__` takes every argument of its `__call__`, plus `mode` and `policy`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from .guides import GuideModel
from .pipeline import (
    Branches, GuidedSamplingMixin, callback_inputs, check_guide_arguments, check_image_size, follow_unet, gives_negative,
    legacy_callback, size_multiple, with_image_embeds,
)
from .policy import GuidancePolicy


class PlugAndPlayXLPipeline(GuidedSamplingMixin, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline plus a `guide` component; every helper is inherited, only `__call__` is new.

    `PlugAndPlayXLPipeline.from_pipe(sdxl_pipe, guide=guide)` switches a loaded SDXL pipeline (a fine-tune, LoRA weights
    loaded) to guided sampling; `pnpguide.loading.load_plug_and_play` picks this class for SDXL folders.
    """

    _optional_components = StableDiffusionXLPipeline._optional_components + ["guide"]

    def __init__(self, vae: AutoencoderKL, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet: UNet2DConditionModel, scheduler,
                 image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None,
                 guide: GuideModel | None = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor,
                         force_zeros_for_empty_prompt, add_watermarker)
        if guide is not None:
            guide.check_compatible(unet)
            guide.check_text_encoder(text_encoder, text_encoder_2)
        self.register_modules(guide=follow_unet(guide, unet))

    def empty_prompt_embeds(self) -> torch.Tensor:
        """One row: what CFG's unconditional pass reads without a negative prompt (zeros with force_zeros_for_empty_prompt)."""
        _, empty, _, _ = self.encode_prompt("", device=self._execution_device, do_classifier_free_guidance=True)
        return empty

    def callback_tensors(self, latents: torch.Tensor, branches: Branches, cfg_call: bool) -> dict:
        """What `callback_on_step_end` may read, as diffusers' loop holds it ([negative; prompt] in a CFG call)."""
        both = (lambda negative, positive: torch.cat([negative, positive])) if cfg_call else (lambda negative, positive: positive)
        added, negative_added = branches.added, branches.negative_added or branches.added
        return {"latents": latents, "prompt_embeds": both(branches.negative_prompt_embeds, branches.prompt_embeds),
                "add_text_embeds": both(negative_added["text_embeds"], added["text_embeds"]),
                "add_time_ids": both(negative_added["time_ids"], added["time_ids"])}

    def apply_callback_outputs(self, outputs: dict, branches: Branches, cfg_call: bool) -> Branches:
        """As the SD pipeline's, plus SDXL's pooled embedding and size ids."""
        for key, name in (("add_text_embeds", "text_embeds"), ("add_time_ids", "time_ids")):
            value = outputs.pop(key, None)
            if value is None:
                continue
            if cfg_call and len(value) == 2 * len(branches.prompt_embeds):
                negative, value = value.chunk(2)
                branches = replace(branches, negative_added=dict(branches.negative_added, **{name: negative}))
            branches = replace(branches, added=dict(branches.added, **{name: value}))
        return super().apply_callback_outputs(outputs, branches, cfg_call)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default, never mutated)
        mode: str | None = None,
        policy: GuidancePolicy | None = None,
        **kwargs,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        """Generate images: `StableDiffusionXLPipeline.__call__`'s arguments (see diffusers), plus `mode` and `policy` (see
        :mod:`pnpguide.pipeline`). In mode "cfg" with no policy the image is diffusers' own."""
        callback, callback_steps = legacy_callback(kwargs)
        callback_on_step_end_tensor_inputs = callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        # 0. defaults and checks, the plan's included: all before the first model call
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size, target_size = original_size or (height, width), target_size or (height, width)
        self.check_inputs(prompt, prompt_2, height, width, callback_steps, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
                          ip_adapter_image_embeds, callback_on_step_end_tensor_inputs)
        check_image_size(height, width, size_multiple(self.vae, self.unet))
        self._guidance_scale, self._guidance_rescale, self._clip_skip = guidance_scale, guidance_rescale, clip_skip
        self._cross_attention_kwargs, self._denoising_end, self._interrupt = cross_attention_kwargs, denoising_end, False
        mode = self.resolved_mode(mode, guidance_scale)
        negative = gives_negative((negative_prompt, negative_prompt_2, negative_prompt_embeds, negative_pooled_prompt_embeds))
        policy = self.call_policy(mode, policy, negative)
        check_guide_arguments(mode, self.guide, negative, guidance_rescale, ip_adapter_image, ip_adapter_image_embeds)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        images = batch_size * num_images_per_prompt
        device = self._execution_device
        plan = self.plan(mode, policy, num_inference_steps, timesteps, sigmas, device)
        plan = cut_at_denoising_end(plan, denoising_end, self.scheduler.config.num_train_timesteps)

        # 1. encode the prompt with both text encoders (and the negative, for CFG or a guide's negative head)
        reads_negative = mode == "cfg" or (mode == "guide" and negative and self.guide.reads_negative_prompt)
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=reads_negative, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip,
        )

        # 2. initial noise, exactly as StableDiffusionXLPipeline prepares it
        latents = self.prepare_latents(images, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents)
        if plan.scheduler is not self.scheduler:  # prepare_latents scaled the noise for self.scheduler
            latents = latents * (plan.scheduler.init_noise_sigma / self.scheduler.init_noise_sigma)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 3. SDXL's added conditioning: the pooled prompt embedding and (original size, crop, target size)
        projection_dim = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(pooled_prompt_embeds.shape[-1])
        time_ids = self._get_add_time_ids(original_size, crops_coords_top_left, target_size, dtype=prompt_embeds.dtype,
                                          text_encoder_projection_dim=projection_dim)
        negative_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = self._get_add_time_ids(negative_original_size, negative_crops_coords_top_left, negative_target_size,
                                                       dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim)
        branches = Branches(prompt_embeds.to(device), None if negative_prompt_embeds is None else negative_prompt_embeds.to(device),
                            {"text_embeds": pooled_prompt_embeds.to(device), "time_ids": time_ids.to(device).repeat(images, 1)})
        if negative_pooled_prompt_embeds is not None and reads_negative:
            branches.negative_added = {"text_embeds": negative_pooled_prompt_embeds.to(device), "time_ids": negative_time_ids.to(device).repeat(images, 1)}
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device, images, mode == "cfg")
            branches = with_image_embeds(branches, image_embeds, mode == "cfg")
        if mode == "guide" and reads_negative:
            branches.negative_rows = self.negative_rows(negative_prompt, negative_prompt_embeds, images, num_images_per_prompt, device)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:  # a UNet that embeds w itself (LCM), as diffusers feeds it
            scale = torch.tensor(guidance_scale - 1).repeat(images)
            timestep_cond = self.get_guidance_scale_embedding(scale, embedding_dim=self.unet.config.time_cond_proj_dim).to(device=device, dtype=latents.dtype)

        # 4. denoising loop: one model call per timestep, of the plan's kind there
        latents = self.denoise(latents, plan, branches, extra_step_kwargs, timestep_cond, callback_on_step_end,
                               callback_on_step_end_tensor_inputs, callback, callback_steps, cfg_call=mode == "cfg")

        # 5. decode, as StableDiffusionXLPipeline does
        image = latents if output_type == "latent" else self.image_processor.postprocess(self.decode(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to (B, 3, H, W) images in [-1, 1] as StableDiffusionXLPipeline decodes them: an fp16 VAE that
        overflows (force_upcast) decodes in fp32 and is cast back, the latents' mean/std if the VAE has them,
        and the invisible watermark where diffusers would apply it."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        vae_dtype = next(iter(self.vae.post_quant_conv.parameters())).dtype
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = self.vae.decode(latents.to(vae_dtype), return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        return self.watermark.apply_watermark(image) if self.watermark is not None else image


def cut_at_denoising_end(plan, denoising_end: float | None, num_train_timesteps: int):
    """SDXL's `denoising_end` (a fraction of the noise schedule, for base + refiner): the plan stops at the timesteps
    above that point, as diffusers cuts its own."""
    if denoising_end is None or not isinstance(denoising_end, float) or not 0 < denoising_end < 1:
        return plan
    cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
    kept = len([t for t in plan.timesteps.tolist() if t >= cutoff])
    return replace(plan, timesteps=plan.timesteps[:kept], num_inference_steps=kept, kinds=plan.kinds[:kept],
                   carry=None if plan.carry is None else replace(plan.carry, timesteps=plan.carry.timesteps[:kept], factors=plan.carry.factors[:kept]))
