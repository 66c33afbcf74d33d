"""PlugAndPlayPipeline: Stable Diffusion with a guide, one UNet pass per step instead of CFG's two."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from .guide import GuideModel
from .teacher import cfg_noise_pred, guided_noise_pred

MODES = ("guide", "cfg", "none")


class PlugAndPlayPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline plus a `guide` component; every helper is inherited, only `__call__` is new.

    Load with `PlugAndPlayPipeline.from_pretrained(base_dir, guide=GuideModel.from_pretrained(guide_dir))`,
    or switch an already-loaded pipeline (a fine-tune, LoRA weights loaded) with
    `PlugAndPlayPipeline.from_pipe(sd_pipe, guide=guide)`.
    """

    _optional_components = StableDiffusionPipeline._optional_components + ["guide"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder,
        tokenizer,
        unet: UNet2DConditionModel,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
        guide: GuideModel | None = None,
    ):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder, requires_safety_checker)
        if guide is not None:
            guide.check_compatible(unet)
            guide.check_text_encoder(text_encoder)
        self.register_modules(guide=guide)

    def check_guidance(self, guidance_scale: float, num_inference_steps: int, mode: str) -> None:
        """Our checks on top of StableDiffusionPipeline.check_inputs: mode, w and steps."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "guide" and self.guide is None:
            raise ValueError("mode='guide' needs a guide: pass guide=GuideModel.from_pretrained(...) or use mode='cfg'")
        if not math.isfinite(guidance_scale) or guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be a finite number > 0 (1 = no guidance), got {guidance_scale}")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if mode == "guide" and guidance_scale != 1:
            low, high = self.guide.config.trained_guidance_range or (1.0, float("inf"))
            if not low <= guidance_scale <= high:
                warnings.warn(f"guidance_scale={guidance_scale} is outside the range the guide was trained on [{low}, {high}]")
            step_counts = self.guide.config.trained_step_counts
            if step_counts and num_inference_steps not in step_counts:
                warnings.warn(f"this guide was step-distilled for {list(step_counts)} DDIM steps, not {num_inference_steps}")

    def sampling_scheduler(self, num_inference_steps: int, mode: str, timesteps=None):
        """The pipeline's scheduler, except for a step-distilled guide at a step count it learnt: it only
        knows the DDIM schedule it was distilled on (recorded in its config), so that one is used."""
        if mode != "guide" or timesteps is not None or not self.guide.config.trained_schedule:
            return self.scheduler
        if num_inference_steps not in (self.guide.config.trained_step_counts or ()):
            return self.scheduler
        return DDIMScheduler.from_config(self.guide.config.trained_schedule)

    def mode_noise_pred(self, mode: str, sample: torch.Tensor, timestep, prompt_embeds: torch.Tensor,
                        negative_prompt_embeds: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        """The model output one sampling step of `mode` uses, at any state (evaluation replays methods at the
        CFG teacher's states with it). sample: (B, C, h, w); negative_prompt_embeds: only read by "cfg"."""
        if mode == "guide":
            return guided_noise_pred(self.unet, self.guide, sample, timestep, prompt_embeds, guidance_scale)
        if mode == "cfg":
            return cfg_noise_pred(self.unet, sample, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale)
        return self.unet(sample, timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        timesteps: list[int] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        mode: str | None = None,
        on_model_output: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generate images. Arguments are StableDiffusionPipeline's, plus `mode`:

        - "guide" (default when a guide is loaded): one UNet pass + the guide per step;
        - "cfg": the classifier-free-guidance teacher, two UNet passes batched as one 2B call;
        - "none": the conditional model alone (the same as any mode at guidance_scale=1).
        `negative_prompt` only affects "cfg": the guide was distilled against the empty prompt.
        `on_model_output(t, model_input, model_output, prompt_embeds)` is called at every step (evaluation
        uses it to compare a method with the teacher on the method's own trajectory).
        A step-distilled guide samples on its own DDIM schedule (see :meth:`sampling_scheduler`).
        """
        mode = mode or ("guide" if self.guide is not None else "cfg")
        mode = "none" if guidance_scale == 1 else mode
        # 0. defaults and checks
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        self.check_guidance(guidance_scale, num_inference_steps, mode)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device

        # 1. encode the prompt (and the empty prompt for the CFG teacher)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, mode == "cfg", negative_prompt, prompt_embeds, negative_prompt_embeds
        )

        # 2. timesteps and initial noise, exactly as StableDiffusionPipeline prepares them
        scheduler = self.sampling_scheduler(num_inference_steps, mode, timesteps)
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps)
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        if scheduler is not self.scheduler:  # prepare_latents scaled the noise for self.scheduler
            latents = latents * (scheduler.init_noise_sigma / self.scheduler.init_noise_sigma)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 3. denoising loop: one model call per step, whichever mode
        for t in self.progress_bar(timesteps):
            model_input = scheduler.scale_model_input(latents, t)
            noise_pred = self.mode_noise_pred(mode, model_input, t, prompt_embeds, negative_prompt_embeds, guidance_scale)
            if on_model_output is not None:
                on_model_output(t, model_input, noise_pred, prompt_embeds)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

        # 4. decode
        if output_type == "latent":
            image = latents
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, None)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=None)
