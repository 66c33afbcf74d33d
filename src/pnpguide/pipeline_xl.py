"""PlugAndPlayXLPipeline: SDXL with a guide. The twin of :class:`pnpguide.pipeline.PlugAndPlayPipeline`: the same
modes, schedules and denoising loop (:class:`GuidedSamplingMixin`), with SDXL's conditioning: two text encoders,
the pooled prompt embedding and the size/crop ids, passed to the UNet (and guide) as `added_cond_kwargs`."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from .guide import GuideModel
from .carry import CorrectionCarry
from .first_step import FirstStepFit
from .pipeline import GuidedSamplingMixin, ModelOutputHook, check_correction_carry, check_first_step_fit, follow_unet
from .schedules import GuidanceScale


class PlugAndPlayXLPipeline(GuidedSamplingMixin, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline plus a `guide` component; every helper is inherited, only `__call__` is new.

    `PlugAndPlayXLPipeline.from_pipe(sdxl_pipe, guide=guide)` switches a loaded SDXL pipeline (a fine-tune,
    LoRA weights loaded) to guided sampling; `pnpguide.loading.load_plug_and_play` picks this class for SDXL folders.
    """

    _optional_components = StableDiffusionXLPipeline._optional_components + ["guide"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet: UNet2DConditionModel,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        guide: GuideModel | None = None,
    ):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor,
                         force_zeros_for_empty_prompt, add_watermarker)
        if guide is not None:
            guide.check_compatible(unet)
            guide.check_text_encoder(text_encoder, text_encoder_2)
        self.register_modules(guide=follow_unet(guide, unet))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        timesteps: list[int] | None = None,
        guidance_scale: GuidanceScale = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        mode: str | None = None,
        on_model_output: ModelOutputHook | None = None,
        guidance_interval: tuple[float, float] | None = None,
        cfg_first_steps: int = 0,
        first_step_fit: FirstStepFit | None = None,
        correction_carry: CorrectionCarry | None = None,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        """Generate images. Arguments are StableDiffusionXLPipeline's (SDXL's size/crop conditioning included),
        plus `mode`, schedules, `guidance_interval`, `cfg_first_steps`, `first_step_fit`, `correction_carry` and `on_model_output` as in PlugAndPlayPipeline.__call__.
        `negative_prompt(_2)` works in "cfg" and with a guide that reads the negative prompt (its token embeddings;
        the pooled negative only enters CFG's unconditional half); other guides ignore it, with a warning."""
        mode = mode or ("guide" if self.guide is not None else "cfg")
        mode = "none" if isinstance(guidance_scale, (int, float)) and guidance_scale == 1 else mode
        # 0. defaults and checks, the schedule's included: all before the first model call
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        negatives = (negative_prompt, negative_prompt_2, negative_prompt_embeds, negative_pooled_prompt_embeds)
        check_first_step_fit(first_step_fit, mode, cfg_first_steps, negatives)
        check_correction_carry(correction_carry, mode, self.guide)
        self.check_guidance(num_inference_steps, mode, height, width, negatives, cfg_first_steps)
        correction_carry = self.carry_for_negative(correction_carry, mode, negatives)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        scheduler, timesteps, schedule, modes = self.guidance_plan(num_inference_steps, timesteps, guidance_scale, guidance_interval, mode,
                                                                   device, cfg_first_steps, first_step_fit, correction_carry, negatives)

        # 1. encode the prompt with both text encoders (and the negative, for the CFG teacher or a guide that reads it)
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, self.encodes_negative(mode, cfg_first_steps), negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
        )

        # 2. initial noise, exactly as StableDiffusionXLPipeline prepares it
        images = batch_size * num_images_per_prompt
        latents = self.prepare_latents(images, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents)
        if scheduler is not self.scheduler:  # prepare_latents scaled the noise for self.scheduler
            latents = latents * (scheduler.init_noise_sigma / self.scheduler.init_noise_sigma)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 3. SDXL's added conditioning: the pooled prompt embedding and (original size, crop, target size)
        added_cond_kwargs, negative_added_cond_kwargs = self.added_conditioning(
            pooled_prompt_embeds, negative_pooled_prompt_embeds, original_size or (height, width), crops_coords_top_left,
            target_size or (height, width), images, prompt_embeds.dtype, device,
        )

        # 4. denoising loop: one model call per step, in the step's mode; a step at w = 1 is the plain UNet
        latents = self.denoise(latents, scheduler, timesteps, schedule, modes, extra_step_kwargs, on_model_output, first_step_fit,
                               correction_carry, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                               added_cond_kwargs=added_cond_kwargs, negative_added_cond_kwargs=negative_added_cond_kwargs)

        # 5. decode
        image = latents if output_type == "latent" else self.image_processor.postprocess(self.decode(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)

    def unconditional_inputs(self, height: int, width: int) -> tuple[torch.Tensor, dict]:
        """One row of what CFG's unconditional pass reads without a negative prompt at this size: the empty prompt's
        token embeddings and pooled embedding (zeros with `force_zeros_for_empty_prompt`) and SDXL's time ids."""
        device = self._execution_device
        _, empty, pooled, empty_pooled = self.encode_prompt("", device=device, do_classifier_free_guidance=True)
        _, added = self.added_conditioning(pooled, empty_pooled, (height, width), (0, 0), (height, width), 1, empty.dtype, device)
        return empty, added

    def added_conditioning(self, pooled_prompt_embeds, negative_pooled_prompt_embeds, original_size, crops_coords_top_left,
                           target_size, images: int, dtype, device) -> tuple[dict, dict | None]:
        """`added_cond_kwargs` for the prompt and for the negative (None outside "cfg"), B rows each:
        text_embeds (B, projection_dim), time_ids (B, 6), built with SDXL's own `_get_add_time_ids`."""
        projection_dim = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(pooled_prompt_embeds.shape[-1])
        time_ids = self._get_add_time_ids(original_size, crops_coords_top_left, target_size, dtype=dtype, text_encoder_projection_dim=projection_dim)
        time_ids = time_ids.to(device).repeat(images, 1)  # (B, 6)
        added = {"text_embeds": pooled_prompt_embeds.to(device), "time_ids": time_ids}
        if negative_pooled_prompt_embeds is None:
            return added, None
        return added, {"text_embeds": negative_pooled_prompt_embeds.to(device), "time_ids": time_ids}

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
