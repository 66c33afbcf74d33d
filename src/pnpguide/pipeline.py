"""PlugAndPlayPipeline: Stable Diffusion with a guide, one UNet pass per step instead of CFG's two.

What the SD and SDXL pipelines share (mode checks, the guide's trained range and schedule, the denoising loop)
lives once in :class:`GuidedSamplingMixin`; `pipeline_xl.PlugAndPlayXLPipeline` is the SDXL twin."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from .guide import GuideModel, per_sample
from .carry import CorrectionCarry
from .first_step import FirstStepFit
from .schedules import GuidanceScale, guidance_schedule
from .teacher import cfg_and_conditional, cfg_combine, guided_noise_pred, output_guided

MODES = ("guide", "cfg", "none")
ModelOutputHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "dict | None"], None]


class GuidedSamplingMixin:
    """The guided sampling both pipelines run, once: a pipeline class adds it before its diffusers base and
    writes only `__call__` (prompt encoding, latents, decoding: the inherited diffusers helpers)."""

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe`, keeping every component's dtype: diffusers casts all shared components (those of
        the original pipeline too) to float32 unless given `dtype`, which would silently turn a half-precision
        pipeline into fp32, or an fp32 VAE beside an fp16 UNet (SDXL's usual set-up) into fp16."""
        if "dtype" in kwargs or "torch_dtype" in kwargs:
            return super().from_pipe(pipeline, **kwargs)
        dtypes = {name: module.dtype for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}
        new = super().from_pipe(pipeline, dtype=pipeline.unet.dtype, **kwargs)
        for name, dtype in dtypes.items():
            module = getattr(new, name, None)
            if isinstance(module, torch.nn.Module) and module.dtype != dtype:
                module.to(dtype)
        return new

    def check_guidance(self, num_inference_steps: int, mode: str, height: int | None = None, width: int | None = None,
                       negatives: tuple = (), cfg_first_steps: int = 0) -> None:
        """Our checks on top of the diffusers pipeline's check_inputs: mode, steps, the guide's dtype and device,
        the image size, `cfg_first_steps` (w: see guidance_schedule). `negatives`: the negative prompt arguments,
        which guide mode ignores (with a warning) unless the guide reads them or CFG runs the first steps."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "guide" and self.guide is None:
            raise ValueError("mode='guide' needs a guide: pass guide=GuideModel.from_pretrained(...) or use mode='cfg'")
        if mode == "guide":
            check_same_placement(self.guide, self.unet)
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        check_cfg_first_steps(cfg_first_steps, num_inference_steps)
        if height is not None and width is not None:
            check_image_size(height, width, size_multiple(self.vae, self.unet))
        if mode == "guide" and not self.guide.reads_negative_prompt and any(n is not None for n in negatives):
            warn_negative_prompt_ignored(cfg_first_steps)

    def encodes_negative(self, mode: str, cfg_first_steps: int = 0) -> bool:
        """Whether this call needs the negative prompt's embeddings (the empty prompt's when none is given): for
        CFG's unconditional half (CFG steps in guide mode included), or for a guide that reads the negative prompt."""
        return mode == "cfg" or (mode == "guide" and (cfg_first_steps > 0 or self.guide.reads_negative_prompt))

    def warn_untrained(self, schedule: list[float], num_inference_steps: int) -> None:
        """Warn when the guide runs at a w or step count it was not trained for: it extrapolates there."""
        guided = [w for w in schedule if w != 1]
        if not guided:
            return
        low, high = self.guide.config.trained_guidance_range or (1.0, float("inf"))
        outside = max(guided) if max(guided) > high else min(guided)
        if not low <= outside <= high:
            warnings.warn(f"guidance_scale={outside} is outside the range the guide was trained on [{low}, {high}]")
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

    def sampling_interval(self, guidance_interval: tuple[float, float] | None, mode: str, negative: bool = False) -> tuple[float, float] | None:
        """The call's `guidance_interval`, or in guide mode without a negative prompt the guide's
        `default_guidance_interval` when the call gives none: the step-distilled guides' guidance costs quality below
        t = 500 and adds nothing to their fidelity, but a negative prompt needs those steps to keep the negated
        attribute out (docs/guides.md, stop 31). Pass `(0, num_train_timesteps)` to guide every step."""
        if guidance_interval is not None or mode != "guide" or self.guide is None or negative:
            return guidance_interval
        default = getattr(self.guide.config, "default_guidance_interval", None)
        return tuple(default) if default is not None else None

    def guidance_plan(self, num_inference_steps: int, timesteps, guidance_scale: GuidanceScale, guidance_interval, mode: str,
                      device, cfg_first_steps: int = 0, first_step_fit: FirstStepFit | None = None,
                      correction_carry: CorrectionCarry | None = None, negatives: tuple = ()):
        """(scheduler, timesteps, one w per model call, one mode per model call), checked before the prompt is encoded;
        `negatives`: the call's negative prompt arguments."""
        scheduler = self.sampling_scheduler(num_inference_steps, mode, timesteps)
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps)
        guidance_interval = self.sampling_interval(guidance_interval, mode, gives_negative(negatives))
        schedule = guidance_schedule(guidance_scale, timesteps.tolist(), guidance_interval, scheduler.config.num_train_timesteps)
        if mode == "guide":
            self.warn_untrained(schedule[first_call_after(timesteps.tolist(), cfg_first_steps):], num_inference_steps)
            warn_output_guide_with_lora(self.guide, self.unet)
        modes = step_modes(mode, timesteps.tolist(), schedule, cfg_first_steps, first_step_fit is not None)
        if mode == "guide":
            self.warn_first_steps_only(correction_carry)
        if correction_carry is not None:
            correction_carry.check_timesteps(timesteps.tolist())
            modes = carried_modes(modes, timesteps.tolist(), correction_carry.full_steps)
        if modes[:1] == ["fit"]:  # the first step: CFG, its unconditional pass from the fit
            first_step_fit.check_timestep(timesteps[0])
            if self.guide.config.trained_step_counts:
                warnings.warn("first_step_fit with a step-distilled guide pulls its first step towards CFG at this step count, "
                              "which is far from the teacher it was distilled from: on the embedded model FID rose 1.4x at 16 "
                              "steps and 2.5x at 8 (docs/guides.md)")
        return scheduler, timesteps, schedule, modes

    def carry_for_negative(self, correction_carry: CorrectionCarry | None, mode: str, negatives: tuple) -> CorrectionCarry | None:
        """The carry this call samples with. A guide whose negative head was distilled on more first steps than the rest
        of it (`negative_first_steps`) runs that many before carrying on when a negative prompt is given: carried on
        earlier, the negated attribute comes back (docs/guides.md, stop 29). Without a negative, the carry as given."""
        steps = getattr(self.guide.config, "negative_first_steps", None) if mode == "guide" and self.guide is not None else None
        if correction_carry is None or not steps or steps <= correction_carry.full_steps or not gives_negative(negatives):
            return correction_carry
        return dataclasses.replace(correction_carry, full_steps=steps)

    def warn_first_steps_only(self, correction_carry: CorrectionCarry | None) -> None:
        """A guide distilled on the teacher's first steps only has not learnt the later ones: those should carry its
        correction on."""
        first_steps = getattr(self.guide.config, "trained_first_steps", None)
        first_steps = first_steps and max(first_steps, getattr(self.guide.config, "negative_first_steps", None) or 0)
        if first_steps and (correction_carry is None or correction_carry.full_steps > first_steps):
            warnings.warn(f"this guide was distilled on the first {first_steps} steps of sampling only: pass correction_carry="
                          f"CorrectionCarry.fit(pipe, prompts, full_steps={first_steps}) (--correction-carry FILE) to carry its "
                          f"correction on after them", stacklevel=5)  # the caller of the pipeline (its __call__ is wrapped by torch.no_grad)

    def mode_noise_pred(self, mode: str, sample: torch.Tensor, timestep, prompt_embeds: torch.Tensor,
                        negative_prompt_embeds: torch.Tensor | None, guidance_scale: float,
                        added_cond_kwargs: dict | None = None, negative_added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """The model output one sampling step of `mode` uses, at any state (evaluation replays methods at the
        CFG teacher's states with it). sample: (B, C, h, w); the negative_* arguments are only read by "cfg";
        `added_cond_kwargs` (SDXL: text_embeds (B, dim), time_ids (B, 6)) and its negative have B rows each.
        A guide that reads the negative prompt gets `negative_prompt_embeds` too."""
        if mode == "guide":
            negative, rows = self.guide_negative(negative_prompt_embeds, sample)
            return guided_noise_pred(self.unet, self.guide, sample, timestep, prompt_embeds, guidance_scale, added_cond_kwargs,
                                     negative_prompt_embeds=negative, negative_rows=rows)
        if mode == "cfg":
            return self.cfg_outputs(sample, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale, added_cond_kwargs,
                                    negative_added_cond_kwargs)[0]
        timestep = per_sample(timestep, sample.shape[0], sample.device)  # diffusers would copy a Python number from the host
        return self.unet(sample, timestep, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    def cfg_outputs(self, sample: torch.Tensor, timestep, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                    guidance_scale: float, added_cond_kwargs: dict | None = None,
                    negative_added_cond_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CFG's output, the conditional output) from the teacher's one 2B call."""
        if added_cond_kwargs is not None and negative_added_cond_kwargs is None:
            raise ValueError("mode 'cfg' with added_cond_kwargs (SDXL) needs negative_added_cond_kwargs for the unconditional half")
        added = None if added_cond_kwargs is None else {k: torch.cat([negative_added_cond_kwargs[k], v]) for k, v in added_cond_kwargs.items()}
        return cfg_and_conditional(self.unet, sample, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale, added)

    def output_guide_outputs(self, sample: torch.Tensor, timestep, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None,
                             guidance_scale: float, added_cond_kwargs: dict | None = None,
                             negative_added_cond_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(an output guide's output, the conditional output) from its one UNet pass."""
        cond = self.mode_noise_pred("none", sample, timestep, prompt_embeds, None, 1.0, added_cond_kwargs)
        negative, rows = self.guide_negative(negative_prompt_embeds, sample)
        timestep = per_sample(timestep, sample.shape[0], sample.device)
        return output_guided(self.guide, cond, sample, timestep, prompt_embeds, guidance_scale, negative, rows), cond

    def guide_negative(self, negative_prompt_embeds: torch.Tensor | None, sample: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(what the guide reads of the negative prompt, which rows have one): nothing for a guide that ignores it; the
        embeddings, the empty prompt's included, for one that reads them beside the prompt (`reads_negative`); for a
        negative head, the embeddings and the rows whose negative is not the empty prompt's (the head is skipped on
        the others, and altogether when no row has one). Worked out once per sampling call, not at every step."""
        if negative_prompt_embeds is None or not self.guide.reads_negative_prompt:
            return None, None
        if not self.guide.config.negative_head:
            return negative_prompt_embeds, None
        cached = getattr(self, "_pnpguide_negative_rows", None)
        if cached is None or cached[0] is not negative_prompt_embeds:
            empty, _ = self.unconditional_inputs(sample.shape[-2] * self.vae_scale_factor, sample.shape[-1] * self.vae_scale_factor)
            same = torch.isclose(negative_prompt_embeds.float(), empty.float().to(negative_prompt_embeds.device), rtol=1e-3, atol=1e-3)
            rows = ~same.flatten(1).all(1)
            cached = (negative_prompt_embeds, rows if bool(rows.any()) else None)
            self._pnpguide_negative_rows = cached
        return (None, None) if cached[1] is None else (negative_prompt_embeds, cached[1])

    def fitted_cfg_noise_pred(self, first_step_fit: FirstStepFit, sample: torch.Tensor, timestep, guidance_scale: float,
                              prompt_embeds: torch.Tensor, added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """CFG at the first step in one UNet pass: the conditional pass, and the unconditional one from the fit."""
        first_step_fit.check_size(sample)
        cond = self.mode_noise_pred("none", sample, timestep, prompt_embeds, None, 1.0, added_cond_kwargs)
        return cfg_combine(first_step_fit(sample), cond, guidance_scale)

    def denoise(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor, schedule: list[float], modes: list[str],
                extra_step_kwargs: dict, on_model_output: ModelOutputHook | None, first_step_fit: FirstStepFit | None = None,
                correction_carry: CorrectionCarry | None = None, **conditioning) -> torch.Tensor:
        """The denoising loop: one model call per step, in that step's mode (see :func:`step_modes`; "fit": CFG with
        the unconditional pass from `first_step_fit`, one UNet call; "carry": the conditional pass plus CFG's last
        correction carried on by `correction_carry`, one UNet call).
        `conditioning`: mode_noise_pred's prompt_embeds, negative_prompt_embeds and (SDXL) added_cond_kwargs,
        negative_added_cond_kwargs. latents: (B, C, h, w), scaled for `scheduler`."""
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as diffusers' SDXL pipeline: text-to-image starts at the first timestep
        # Python timesteps, read from the device once: a device tensor t makes each step wait for the GPU where the
        # scheduler branches on it (DDIM: `if prev_timestep >= 0`) or indexes a CPU table with it; the model calls
        # fill t in on the device instead (guide.per_sample)
        correction = None  # with correction_carry: CFG's last cond - uncond, carried on from call to call
        for call, (t, w, mode) in enumerate(zip(self.progress_bar(timesteps.tolist()), schedule, modes)):
            model_input = scheduler.scale_model_input(latents, t)
            if correction is not None and mode in ("carry", "none"):
                correction = correction * correction_carry.factors[call]
            if mode == "fit":
                noise_pred = self.fitted_cfg_noise_pred(first_step_fit, model_input, t, w, conditioning["prompt_embeds"],
                                                        conditioning.get("added_cond_kwargs"))
            elif mode in ("cfg", "guide") and correction_carry is not None:
                outputs = self.cfg_outputs if mode == "cfg" else self.output_guide_outputs
                noise_pred, cond = outputs(model_input, t, guidance_scale=w, **conditioning)
                correction = (noise_pred - cond) / (w - 1)
            elif mode == "carry":
                noise_pred = self.mode_noise_pred("none", model_input, t, guidance_scale=1.0, **conditioning)
                if correction is not None:
                    noise_pred = noise_pred + (w - 1) * correction
            else:
                noise_pred = self.mode_noise_pred(mode, model_input, t, guidance_scale=w, **conditioning)
            if on_model_output is not None:
                on_model_output(t, model_input, noise_pred, conditioning["prompt_embeds"], conditioning.get("added_cond_kwargs"))
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        return latents


class PlugAndPlayPipeline(GuidedSamplingMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline plus a `guide` component; every helper is inherited, only `__call__` is new.

    Load with `PlugAndPlayPipeline.from_pretrained(base_dir, guide=GuideModel.from_pretrained(guide_dir))`,
    or switch an already-loaded pipeline (a fine-tune, LoRA weights loaded) with
    `PlugAndPlayPipeline.from_pipe(sd_pipe, guide=guide)`.
    """

    _optional_components = StableDiffusionPipeline._optional_components + ["guide"]

    def unconditional_inputs(self, height: int, width: int) -> tuple[torch.Tensor, dict | None]:
        """One row of what CFG's unconditional pass reads without a negative prompt: the empty prompt's embedding."""
        _, empty = self.encode_prompt([""], self._execution_device, 1, True)
        return empty, None

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
        self.register_modules(guide=follow_unet(guide, unet))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        timesteps: list[int] | None = None,
        guidance_scale: GuidanceScale = 7.5,
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
        on_model_output: ModelOutputHook | None = None,
        guidance_interval: tuple[float, float] | None = None,
        cfg_first_steps: int = 0,
        first_step_fit: FirstStepFit | None = None,
        correction_carry: CorrectionCarry | None = None,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generate images. Arguments are StableDiffusionPipeline's, plus `mode`:

        - "guide" (default when a guide is loaded): one UNet pass + the guide per step;
        - "cfg": the classifier-free-guidance teacher, two UNet passes batched as one 2B call;
        - "none": the conditional model alone (the same as any mode at guidance_scale=1).
        `guidance_scale` may also be a schedule: a list with one w per step, or a callable
        `(step_index, timestep) -> w`; `guidance_interval=(t_low, t_high)` applies w only at timesteps inside
        that range, w = 1 elsewhere (see :func:`pnpguide.schedules.guidance_schedule`); in guide mode without one, the
        guide's `default_guidance_interval` if it records one and no negative prompt is given (:meth:`sampling_interval`). Steps at w = 1 run the
        UNet alone, once at batch B, in every mode.
        `cfg_first_steps=k` (guide mode): the first k steps run CFG's two passes, the rest the guide. Those
        high-noise steps set the layout and hold most of the gap between a guide and CFG, so k = 2 of 25 brings the
        image much closer to CFG's for 2 more UNet passes (27, against CFG's 50; docs/guides.md); the negative
        prompt applies in those steps.
        `first_step_fit` (guide mode, :class:`pnpguide.FirstStepFit`): the first step runs CFG with its unconditional
        pass taken from this affine fit, so it costs one UNet pass; it stands in for the empty prompt's pass, so it
        takes no negative prompt.
        `correction_carry` (cfg mode, :class:`pnpguide.CorrectionCarry`): CFG's two passes for its first `full_steps`
        steps, then the conditional pass alone plus CFG's last correction carried on by the fitted factors, one UNet
        pass per step: no guide, any checkpoint, and the negative prompt keeps its effect. In guide mode, with an
        output guide (one distilled on those first steps: `pnpguide distill --trajectory-first-steps`), the guide
        runs the first `full_steps` steps and its correction is carried on after them: one UNet pass per step
        throughout, and the guide only at those steps.
        `negative_prompt` works in "cfg" and, with a guide distilled on negative prompts (`guide.reads_negative_prompt`:
        `pnpguide distill --negatives` or `--negative-head`), in "guide"; an older guide was distilled against the empty prompt only and ignores it, with a warning. Height and width must be multiples of :func:`size_multiple`.
        `on_model_output(t, model_input, model_output, prompt_embeds, added_cond_kwargs)` is called at every step (evaluation
        uses it to compare a method with the teacher on the method's own trajectory).
        A step-distilled guide samples on its own DDIM schedule (see :meth:`sampling_scheduler`).
        """
        mode = mode or ("guide" if self.guide is not None else "cfg")
        mode = "none" if isinstance(guidance_scale, (int, float)) and guidance_scale == 1 else mode
        # 0. defaults and checks, the schedule's included: all before the first model call
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        check_first_step_fit(first_step_fit, mode, cfg_first_steps, (negative_prompt, negative_prompt_embeds))
        check_correction_carry(correction_carry, mode, self.guide)
        self.check_guidance(num_inference_steps, mode, height, width, (negative_prompt, negative_prompt_embeds), cfg_first_steps)
        correction_carry = self.carry_for_negative(correction_carry, mode, (negative_prompt, negative_prompt_embeds))
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        scheduler, timesteps, schedule, modes = self.guidance_plan(num_inference_steps, timesteps, guidance_scale, guidance_interval, mode,
                                                                   device, cfg_first_steps, first_step_fit, correction_carry,
                                                                   (negative_prompt, negative_prompt_embeds))

        # 1. encode the prompt (and the negative, the empty prompt by default, for the CFG teacher or a guide that reads it)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.encodes_negative(mode, cfg_first_steps), negative_prompt, prompt_embeds,
            negative_prompt_embeds,
        )

        # 2. initial noise, exactly as StableDiffusionPipeline prepares it
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        if scheduler is not self.scheduler:  # prepare_latents scaled the noise for self.scheduler
            latents = latents * (scheduler.init_noise_sigma / self.scheduler.init_noise_sigma)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 3. denoising loop: one model call per step, in the step's mode; a step at w = 1 is the plain UNet
        latents = self.denoise(latents, scheduler, timesteps, schedule, modes, extra_step_kwargs, on_model_output, first_step_fit,
                               correction_carry, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)

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


def follow_unet(guide: GuideModel | None, unet) -> GuideModel | None:
    """The guide on the UNet's device and in its dtype (cast in place, as `pipe.to` would): a guide loaded in fp32
    and a UNet loaded in half precision otherwise meet as torch's "mat1 and mat2 must have the same dtype"."""
    if guide is not None and (guide.dtype != unet.dtype or guide.device != unet.device):
        guide.to(device=unet.device, dtype=unet.dtype)
    return guide


def check_same_placement(guide: GuideModel, unet) -> None:
    """One line naming both dtypes (or devices) when the guide and the UNet were moved apart after registration."""
    if guide.dtype != unet.dtype:
        raise ValueError(f"the guide is {guide.dtype} but the UNet is {unet.dtype}: move both with pipe.to(dtype) (or guide.to({unet.dtype}))")
    if guide.device != unet.device:
        raise ValueError(f"the guide is on {guide.device} but the UNet is on {unet.device}: move both with pipe.to(device)")


def size_multiple(vae, unet) -> int:
    """What image sides must be a multiple of: the VAE's downsampling times the UNet's, 2^(down blocks - 1), so
    that every skip connection the guide adds to is exactly as large as the decoder tensor it meets."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)


def check_image_size(height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")


def warn_negative_prompt_ignored(cfg_first_steps: int = 0) -> None:
    """The one place that says it, for both pipelines (Python shows a warning from one place once)."""
    where = f"after the first {cfg_first_steps} (CFG) step{'s' if cfg_first_steps > 1 else ''}" if cfg_first_steps else "in guide mode"
    warnings.warn(
        f"negative_prompt is ignored {where}: this guide was distilled against the empty prompt only. "
        "Use mode='cfg' (--mode cfg) to apply a negative prompt, or a guide distilled with negatives (pnpguide distill --negatives).",
        UserWarning,
        stacklevel=3,  # the pipeline's __call__
    )


def warn_output_guide_with_lora(guide: GuideModel, unet) -> None:
    """An output guide adds, after the UNet, the CFG correction of the UNet it was distilled on; LoRA weights change
    that correction, so such a guide is not plug-and-play (docs/guides.md, stop 32: even the base's exact correction
    closed none of a LoRA's own CFG gap). Residual guides go through the LoRA's own layers and are not warned about."""
    if guide.reads_unet_output and getattr(unet, "peft_config", None):
        warnings.warn("LoRA weights are loaded and this is an output guide: it adds the CFG correction of the UNet it was "
                      "distilled on, which LoRA weights change, so its images can be further from this model's CFG than "
                      "unguided ones; use mode='cfg' with a correction_carry fitted on this model (pnpguide fit-carry --lora)",
                      stacklevel=5)


def gives_negative(negatives: tuple) -> bool:
    """Whether a call's negative prompt arguments hold a negative: embeddings, or a prompt that is not empty."""
    texts = lambda n: [n] if isinstance(n, str) else n if isinstance(n, list) else None  # noqa: E731
    return any(n is not None and (texts(n) is None or any(texts(n))) for n in negatives)


def check_cfg_first_steps(cfg_first_steps, num_inference_steps: int | None) -> None:
    if isinstance(cfg_first_steps, bool) or not isinstance(cfg_first_steps, int) or cfg_first_steps < 0:
        raise ValueError(f"cfg_first_steps must be a whole number >= 0 (steps that run CFG before the guide), got {cfg_first_steps!r}")
    if num_inference_steps is not None and cfg_first_steps > num_inference_steps:
        raise ValueError(f"cfg_first_steps={cfg_first_steps} is more than the {num_inference_steps} sampling steps")


def check_first_step_fit(first_step_fit: FirstStepFit | None, mode: str, cfg_first_steps: int, negatives: tuple) -> None:
    if first_step_fit is None:
        return
    if not isinstance(first_step_fit, FirstStepFit):
        raise ValueError(f"first_step_fit must be a pnpguide.FirstStepFit (FirstStepFit.fit(pipe, ...)), got {type(first_step_fit).__name__}")
    if mode != "guide" or cfg_first_steps:
        raise ValueError("first_step_fit replaces the first CFG step's unconditional pass in guide mode: use it with mode='guide' "
                         "and cfg_first_steps=0 (with cfg_first_steps >= 1 the first step already runs CFG in full)")
    if any(n is not None for n in negatives):
        raise ValueError("first_step_fit stands in for the empty prompt's unconditional pass and cannot apply a negative prompt: "
                         "use cfg_first_steps=1 instead")


def check_correction_carry(correction_carry: CorrectionCarry | None, mode: str, guide: GuideModel | None) -> None:
    if correction_carry is None:
        return
    if not isinstance(correction_carry, CorrectionCarry):
        raise ValueError(f"correction_carry must be a pnpguide.CorrectionCarry (CorrectionCarry.fit(pipe, prompts)), got {type(correction_carry).__name__}")
    if mode == "guide" and guide is not None:  # ("none", w = 1: there is no correction to carry, and nothing to refuse)
        check_guide_carries(guide.config.reads)


def check_guide_carries(reads: str) -> None:
    """Only an output guide's step splits into the conditional output and a correction that can be carried on."""
    if reads != "unet_output":
        raise ValueError(f"correction_carry in guide mode carries an output guide's correction on, and this guide reads "
                         f"{reads!r}: use an output guide (pnpguide distill --reads unet_output) or mode='cfg'")


def carried_modes(modes: list[str], timesteps: list, full_steps: int) -> list[str]:
    """After the first `full_steps` steps, CFG's and the guide's calls become "carry" (one UNet pass, the last
    correction carried on)."""
    first_carried = first_call_after(timesteps, full_steps)
    return [mode if i < first_carried or mode not in ("cfg", "guide") else "carry" for i, mode in enumerate(modes)]


def first_call_after(timesteps: list, steps: int) -> int:
    """Index of the first model call after the first `steps` distinct timesteps (PNDM and Heun call the model
    twice at some timesteps: both calls belong to one step)."""
    distinct = list(dict.fromkeys(timesteps))
    if steps >= len(distinct):
        return len(timesteps)
    return timesteps.index(distinct[steps])


def step_modes(mode: str, timesteps: list, schedule: list[float], cfg_first_steps: int = 0, first_step_fit: bool = False) -> list[str]:
    """One mode per model call: "none" where w = 1 (the plain UNet, in every mode); in guide mode, "cfg" for the
    first `cfg_first_steps` steps, then "guide", and with `first_step_fit` "fit" (CFG in one pass) at a guided first call."""
    first_guided = first_call_after(timesteps, cfg_first_steps) if mode == "guide" else 0
    modes = ["none" if w == 1 else "cfg" if i < first_guided else mode for i, w in enumerate(schedule)]
    if first_step_fit and modes[:1] == ["guide"]:
        modes[0] = "fit"
    return modes
