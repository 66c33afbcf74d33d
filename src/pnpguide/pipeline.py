"""PlugAndPlayPipeline: Stable Diffusion with a guide, one UNet pass per step instead of CFG's two.

A drop-in for diffusers' `StableDiffusionPipeline`: `__call__` takes every argument of the installed
`StableDiffusionPipeline.__call__`, and adds two:
- `mode`: "guide" (the default when a guide is loaded), "cfg" (the teacher, diffusers' own image) or "none";
- `policy`: a :class:`pnpguide.GuidancePolicy`, how guidance is spent over the steps. By default, in guide mode, the
  guide's own (its folder's first steps and correction carry, grid, interval); in CFG mode, CFG at every step.

What the SD and SDXL pipelines share (the plan of each step, the denoising loop, the callbacks) lives once in
:class:`GuidedSamplingMixin`; `pipeline_xl.PlugAndPlayXLPipeline` is the SDXL twin.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps

from .carry import CorrectionCarry
from .guides import GuideModel, OutputGuide
from .guides.base import per_sample
from .policy import GuidancePolicy
from .quiet import quiet_casts
from .grid_scheduler import GridDDIMScheduler
from .teacher import cfg_combine, guided_noise_pred

MODES = ("guide", "cfg", "none")
DIFFUSERS_DEFAULT_STEPS = 50  # StableDiffusionPipeline's num_inference_steps, when neither the call nor the policy gives one


@dataclass
class Branches:
    """What the UNet reads at each step, B rows each: the prompt's embeddings and added conditioning (SDXL's pooled
    embedding and size ids, IP-Adapter image embeddings), and for CFG or a negative head the negative's."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    added: dict | None = None
    negative_added: dict | None = None
    negative_rows: torch.Tensor | None = None  # (B,) bool: rows with a non-empty negative prompt (a negative head runs there)


@dataclass
class ObservedStep:
    """One model call, as a :meth:`GuidedSamplingMixin.model_output_observer` sees it."""

    timestep: float
    kind: str  # "cfg", "guide", "carry" or "none"
    model_input: torch.Tensor
    output: torch.Tensor  # the model output the scheduler stepped with
    conditional: torch.Tensor | None  # the UNet's conditional output, where the step computed it
    branches: Branches


@dataclass
class StepPlan:
    """A call's sampling plan, made before the prompt is encoded: the scheduler and timesteps, and what each model call runs."""

    scheduler: Any
    timesteps: torch.Tensor
    num_inference_steps: int
    kinds: list[str]
    carry: CorrectionCarry | None
    adaptive_threshold: float | None


class GuidedSamplingMixin:
    """The guided sampling both pipelines run, once: a pipeline class adds it before its diffusers base and writes
    only `__call__` (prompt encoding, latents, decoding: the inherited diffusers helpers)."""

    _model_output_observer: Callable[[ObservedStep], None] | None = None
    lora_reach: LoraReach | None = None  # set by measure_lora_distance; read by the LoRA warning

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe`, keeping every component's dtype: diffusers casts all shared components (those of
        the original pipeline too) to float32 unless given `dtype`, which would silently turn a half-precision
        pipeline into fp32, or an fp32 VAE beside an fp16 UNet (SDXL's usual set-up) into fp16."""
        if "dtype" in kwargs or "torch_dtype" in kwargs:
            with quiet_casts():
                return super().from_pipe(pipeline, **kwargs)
        dtypes = {name: module.dtype for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}
        with quiet_casts():
            new = super().from_pipe(pipeline, dtype=pipeline.unet.dtype, **kwargs)
            for name, dtype in dtypes.items():
                module = getattr(new, name, None)
                if isinstance(module, torch.nn.Module) and module.dtype != dtype:
                    module.to(dtype)
        return new

    def to(self, *args, **kwargs):
        with quiet_casts():
            return super().to(*args, **kwargs)

    @torch.no_grad()
    def measure_lora_distance(self, prompts: list[str], guidance_scale: float = 7.5, num_inference_steps: int = 25, seed: int = 0) -> float:
        """How far the active LoRA weights move this model from its base, as a guide sees it: MSE(CFG with them, CFG
        without) / MSE(no guidance without, CFG without) on the images of `prompts` (at most 8), same seeds; 0 for
        weights that change nothing. The result is kept for the LoRA warning (at most REACH: no warning)."""
        prompts = prompts[:8]

        def sample(w: float):
            generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
            return self(prompts, guidance_scale=w, num_inference_steps=num_inference_steps, generator=generators, mode="cfg",
                        output_type="np").images

        adapters, scale = active_lora_adapters(self.unet), active_lora_scale(self.unet)
        finetuned = sample(guidance_scale)
        self.disable_lora()
        try:
            base, unguided = sample(guidance_scale), sample(1.0)
        finally:
            self.enable_lora()
        distance = float(((finetuned - base) ** 2).mean() / ((unguided - base) ** 2).mean())
        self.lora_reach = LoraReach(distance, adapters, scale)
        return distance

    @contextlib.contextmanager
    def model_output_observer(self, observer: Callable[[ObservedStep], None]):
        """Within the block, `observer(ObservedStep)` is called after every model call of this pipeline (evaluation and
        `CorrectionCarry.fit` read the model outputs with it)."""
        previous, self._model_output_observer = self._model_output_observer, observer
        try:
            yield
        finally:
            self._model_output_observer = previous

    # -- checks and plan, all before the prompt is encoded ------------------------------------------------------------

    def resolved_mode(self, mode: str | None, guidance_scale: float) -> str:
        """The call's mode: "guide" when a guide is loaded, else "cfg"; "none" where diffusers runs no CFG (w <= 1)."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        mode = mode or ("guide" if self.guide is not None else "cfg")
        if mode == "guide" and self.guide is None:
            raise ValueError("mode='guide' needs a guide: pass guide=GuideModel.from_pretrained(...) or use mode='cfg'")
        if mode == "guide":
            check_same_placement(self.guide, self.unet)
        if self.unet.config.time_cond_proj_dim is not None and mode == "guide":
            raise ValueError("this UNet embeds the guidance scale itself (time_cond_proj_dim, as LCM's does): sample it with mode='cfg'")
        return "none" if guidance_scale <= 1 or self.unet.config.time_cond_proj_dim is not None else mode

    def call_policy(self, mode: str, policy: GuidancePolicy | None, negative: bool) -> GuidancePolicy:
        """The policy this call samples with: the call's, or the guide's own in guide mode, or plain CFG."""
        if policy is not None and not isinstance(policy, GuidancePolicy):
            raise ValueError(f"policy must be a pnpguide.GuidancePolicy, got {type(policy).__name__}")
        if policy is None:
            policy = self.guide.policy if mode == "guide" else GuidancePolicy()
        policy = policy.for_call(negative)
        if policy.adaptive_threshold is not None and mode == "guide":
            raise ValueError("adaptive_threshold compares CFG's two passes, which guide mode does not run: use it with mode='cfg'")
        if policy.carry is not None and mode == "guide" and not is_output_guide(self.guide):
            raise ValueError("a carry in guide mode carries an output guide's correction on, and this is a residual guide: "
                             "use an output guide or mode='cfg'")
        return policy

    def plan(self, mode: str, policy: GuidancePolicy, num_inference_steps: int | None, timesteps, sigmas, device) -> StepPlan:
        """The scheduler, timesteps and the kind of each model call ("cfg", "guide", "carry" or "none")."""
        scheduler, steps = self.scheduler, num_inference_steps
        if steps is None:
            steps = policy.num_inference_steps or DIFFUSERS_DEFAULT_STEPS
        on_grid = policy.timesteps is not None and timesteps is None and sigmas is None and steps == len(policy.timesteps)
        if on_grid:  # a step-distilled guide knows only its own grid
            scheduler, timesteps, steps = GridDDIMScheduler.from_config(policy.scheduler_config), list(policy.timesteps), None
        elif policy.timesteps is not None and mode == "guide":
            warnings.warn(f"this guide was step-distilled for {len(policy.timesteps)} steps on its own grid; at {steps} steps it "
                          "samples a grid it did not learn", stacklevel=4)
        if steps is not None and steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        timesteps, steps = retrieve_timesteps(scheduler, steps, device, timesteps, sigmas)
        calls = [float(t) for t in timesteps]
        carry = policy.carry.resampled(calls) if policy.carry is not None and mode != "none" else None
        adaptive = policy.adaptive_threshold is not None  # Adaptive Guidance decides per image when CFG ends
        first_carried = first_call_after(calls, carry.full_steps) if carry is not None and not adaptive else len(calls)
        kinds = ["none" if mode == "none" or not policy.guided_at(t) else "carry" if i >= first_carried else mode
                 for i, t in enumerate(calls)]
        if mode == "guide":
            self.warn_untrained(policy, carry)
            warn_lora_reach(self.unet, getattr(self, "_cross_attention_kwargs", None), self.lora_reach)
        return StepPlan(scheduler, timesteps, steps, kinds, carry, policy.adaptive_threshold)

    def warn_untrained(self, policy: GuidancePolicy, carry: CorrectionCarry | None) -> None:
        """Warn where the guide would run where it did not learn to: another w, or steps past the first ones it learnt."""
        low, high = self.guide.config.trained_guidance_range or (1.0, float("inf"))
        if not low <= self.guidance_scale <= high:
            warnings.warn(f"guidance_scale={self.guidance_scale} is outside the range the guide was trained on [{low}, {high}]", stacklevel=5)
        first_steps = getattr(self.guide.config, "trained_first_steps", None)
        if first_steps and carry is None:
            warnings.warn(f"this guide learnt the first {first_steps} steps of sampling only, and this call's policy has no carry: "
                          "it runs at steps it never learnt (leave policy out to use the guide's own)", stacklevel=5)

    # -- one model call of each kind ------------------------------------------------------------------------------

    def run_unet(self, sample: torch.Tensor, t, prompt_embeds: torch.Tensor, added: dict | None, timestep_cond=None) -> torch.Tensor:
        timestep = per_sample(t, sample.shape[0], sample.device)  # filled in on the device: no host-to-device copy per step
        return self.unet(sample, timestep, encoder_hidden_states=prompt_embeds, timestep_cond=timestep_cond,
                         cross_attention_kwargs=getattr(self, "_cross_attention_kwargs", None), added_cond_kwargs=added,
                         return_dict=False)[0]

    def unconditional_and_conditional(self, sample: torch.Tensor, t, branches: Branches, rows: torch.Tensor | None = None):
        """CFG's two passes in one call of B + n rows, [uncond of `rows` (None: all); cond], as diffusers batches them."""
        negative, negative_added = branches.negative_prompt_embeds, branches.negative_added
        if rows is not None:
            negative, negative_added, unconditional_sample = negative[rows], select_rows(negative_added, rows), sample[rows]
        else:
            unconditional_sample = sample
        output = self.run_unet(torch.cat([unconditional_sample, sample]), t, torch.cat([negative, branches.prompt_embeds]),
                               concat_added(negative_added, branches.added))
        return output[: len(unconditional_sample)], output[len(unconditional_sample):]

    def model_output(self, kind: str, sample: torch.Tensor, t, branches: Branches, guidance_scale: float,
                     timestep_cond=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the output to step with, the conditional output, the correction `cond - uncond` it used) of one stateless model
        call: "cfg", "guide" or "none". Evaluation replays methods at the teacher's states with it."""
        if kind == "none":
            cond = self.run_unet(sample, t, branches.prompt_embeds, branches.added, timestep_cond)
            return cond, cond, None
        if kind == "cfg":
            uncond, cond = self.unconditional_and_conditional(sample, t, branches)
            return cfg_combine(uncond, cond, guidance_scale), cond, cond - uncond
        if is_output_guide(self.guide):
            cond = self.run_unet(sample, t, branches.prompt_embeds, branches.added)
            timestep = per_sample(t, sample.shape[0], sample.device)
            correction = self.guide(sample, timestep, branches.prompt_embeds, guidance_scale, unet_output=cond,
                                    negative_encoder_hidden_states=branches.negative_prompt_embeds if branches.negative_rows is not None else None,
                                    negative_rows=branches.negative_rows).sample.to(cond.dtype)
            return cond + correction, cond, correction / (guidance_scale - 1)
        output = guided_noise_pred(self.unet, self.guide, sample, t, branches.prompt_embeds, guidance_scale, branches.added,
                                   getattr(self, "_cross_attention_kwargs", None))  # (None outside a call: replays at stored states)
        return output, None, None

    def adaptive_cfg(self, sample: torch.Tensor, t, branches: Branches, w: float, active: torch.Tensor, correction, factor: float,
                     threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adaptive Guidance's step: CFG on the rows still `active`, the conditional pass (plus a carried correction, if
        any) on the others; a row stops being active once its outputs' cosine reaches `threshold`."""
        rows = active.nonzero().flatten()
        uncond, cond = self.unconditional_and_conditional(sample, t, branches, rows)
        output = cond.clone()
        if correction is not None:
            correction = correction * factor
            output = cond + (w - 1) * correction
        output[rows] = cfg_combine(uncond, cond[rows], w)
        difference = cond[rows] - uncond
        correction = torch.zeros_like(cond) if correction is None else correction
        correction[rows] = difference
        cosine = torch.nn.functional.cosine_similarity(cond[rows].flatten(1).float(), uncond.flatten(1).float(), dim=1)
        active = active.clone()
        active[rows] = cosine < threshold
        return output, cond, correction, active

    # -- the loop ---------------------------------------------------------------------------------------------------

    def denoise(self, latents: torch.Tensor, plan: StepPlan, branches: Branches, extra_step_kwargs: dict, timestep_cond=None,
                callback_on_step_end=None, callback_on_step_end_tensor_inputs=(), callback=None, callback_steps: int | None = None,
                cfg_call: bool = False) -> torch.Tensor:
        """The denoising loop: one model call per timestep, of the plan's kind there. `cfg_call`: the call runs CFG, so
        callbacks see the embeddings concatenated [negative; prompt] as diffusers' own loop holds them."""
        scheduler, timesteps = plan.scheduler, plan.timesteps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as diffusers' SDXL pipeline: text-to-image starts at the first timestep
        correction, active = None, None  # the last `cond - uncond`, carried on; Adaptive Guidance's rows still guided
        if plan.adaptive_threshold is not None:
            active = torch.ones(len(latents), dtype=torch.bool, device=latents.device)
        num_warmup_steps = max(len(timesteps) - plan.num_inference_steps * scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=plan.num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps.tolist()):  # Python timesteps: a device tensor makes each step wait for the GPU
                if self.interrupt:
                    continue
                model_input = scheduler.scale_model_input(latents, t)
                w = self.guidance_scale
                kind = plan.kinds[i] if w > 1 else "none"  # a callback may have turned guidance off (w <= 1)
                factor = plan.carry.factors[i] if plan.carry is not None else 1.0
                if kind == "cfg" and active is not None:
                    output, cond, correction, active = self.adaptive_cfg(model_input, t, branches, w, active, correction, factor, plan.adaptive_threshold)
                elif kind in ("cfg", "guide"):
                    output, cond, correction = self.model_output(kind, model_input, t, branches, w, timestep_cond)
                else:
                    output, cond, _ = self.model_output("none", model_input, t, branches, w, timestep_cond)
                    if correction is not None:
                        correction = correction * factor
                        if kind == "carry":
                            output = cond + (w - 1) * correction
                if self.guidance_rescale > 0 and kind != "none":
                    if cond is None:
                        raise ValueError("guidance_rescale needs the conditional output, which a residual guide does not compute: "
                                         "use an output guide or mode='cfg'")
                    output = rescale_noise_cfg(output, cond, guidance_rescale=self.guidance_rescale)  # Lin et al. 2024, sec. 3.4
                if self._model_output_observer is not None:
                    self._model_output_observer(ObservedStep(t, kind, model_input, output, cond, branches))
                latents = scheduler.step(output, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = self.callback_tensors(latents, branches, cfg_call)
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    branches = self.apply_callback_outputs(outputs, branches, cfg_call)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        callback(i // getattr(scheduler, "order", 1), t, latents)
        return latents

    def apply_callback_outputs(self, outputs: dict, branches: Branches, cfg_call: bool) -> Branches:
        """The prompt embeddings a callback returned, back into the branches ([negative; prompt] in a CFG call; a
        callback that keeps the prompt's half alone, as diffusers' CFG cut-off does, leaves the negative as it was)."""
        embeds = outputs.pop("prompt_embeds", None)
        if embeds is not None:
            if cfg_call and len(embeds) == 2 * len(branches.prompt_embeds):
                negative, embeds = embeds.chunk(2)
                branches = replace(branches, negative_prompt_embeds=negative)
            branches = replace(branches, prompt_embeds=embeds)
        negative = outputs.pop("negative_prompt_embeds", None)
        return branches if negative is None or cfg_call else replace(branches, negative_prompt_embeds=negative)

    def negative_rows(self, negative_prompt, negative_prompt_embeds: torch.Tensor | None, rows: int, images_per_prompt: int,
                      device) -> torch.Tensor | None:
        """(rows,) bool: the rows whose negative prompt is not empty (None: no row has one). Given as text, from the text;
        given as embeddings, by comparing them with the empty prompt's."""
        if negative_prompt is not None:
            texts = [negative_prompt] * (rows // images_per_prompt) if isinstance(negative_prompt, str) else list(negative_prompt)
            has = torch.tensor([bool(text) for text in texts], device=device).repeat_interleave(images_per_prompt)
        elif negative_prompt_embeds is not None:
            empty = self.empty_prompt_embeds().to(negative_prompt_embeds)
            has = ~torch.isclose(negative_prompt_embeds.float(), empty.float(), rtol=1e-3, atol=1e-3).flatten(1).all(1)
        else:
            return None
        return has if bool(has.any()) else None


class PlugAndPlayPipeline(GuidedSamplingMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline plus a `guide` component; every helper is inherited, only `__call__` is new.

    Load with `PlugAndPlayPipeline.from_pretrained(base_dir, guide=GuideModel.from_pretrained(guide_dir))`, or switch a
    loaded pipeline (a fine-tune, LoRA weights loaded) with `PlugAndPlayPipeline.from_pipe(sd_pipe, guide=guide)`.
    """

    _optional_components = StableDiffusionPipeline._optional_components + ["guide"]

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: UNet2DConditionModel, scheduler, safety_checker=None,
                 feature_extractor=None, image_encoder=None, requires_safety_checker: bool = False, guide: GuideModel | None = None):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder, requires_safety_checker)
        if guide is not None:
            guide.check_compatible(unet)
            guide.check_text_encoder(text_encoder)
        self.register_modules(guide=follow_unet(guide, unet))

    def empty_prompt_embeds(self) -> torch.Tensor:
        """One row: the empty prompt's embeddings, what CFG's unconditional pass reads without a negative prompt."""
        _, empty = self.encode_prompt([""], self._execution_device, 1, True)
        return empty

    def callback_tensors(self, latents: torch.Tensor, branches: Branches, cfg_call: bool) -> dict:
        """What `callback_on_step_end` may read, as diffusers' loop holds it."""
        prompt_embeds = torch.cat([branches.negative_prompt_embeds, branches.prompt_embeds]) if cfg_call else branches.prompt_embeds
        return {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": branches.negative_prompt_embeds}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default, never mutated)
        mode: str | None = None,
        policy: GuidancePolicy | None = None,
        **kwargs,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generate images: `StableDiffusionPipeline.__call__`'s arguments (see diffusers), plus `mode` and `policy` (see
        the module). `num_inference_steps` defaults to the policy's step count (a step-distilled guide's grid, a carry's
        steps), else diffusers' 50. In mode "cfg" with no policy the image is diffusers' own."""
        callback, callback_steps = legacy_callback(kwargs)
        callback_on_step_end_tensor_inputs = callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        # 0. defaults and checks, the plan's included: all before the first model call
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, callback_steps, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs)
        check_image_size(height, width, size_multiple(self.vae, self.unet))
        self._guidance_scale, self._guidance_rescale, self._clip_skip = guidance_scale, guidance_rescale, clip_skip
        self._cross_attention_kwargs, self._interrupt = cross_attention_kwargs, False
        mode = self.resolved_mode(mode, guidance_scale)
        negative = gives_negative((negative_prompt, negative_prompt_embeds))
        policy = self.call_policy(mode, policy, negative)
        check_guide_arguments(mode, self.guide, negative, guidance_rescale, ip_adapter_image, ip_adapter_image_embeds)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        plan = self.plan(mode, policy, num_inference_steps, timesteps, sigmas, device)

        # 1. encode the prompt (and the negative, for CFG or a guide's negative head), as StableDiffusionPipeline does
        reads_negative = mode == "cfg" or (mode == "guide" and negative and self.guide.reads_negative_prompt)
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        if clip_skip is not None:
            expose_text_model(self.text_encoder)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, reads_negative, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip,
        )
        branches = Branches(prompt_embeds, negative_prompt_embeds)
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                                batch_size * num_images_per_prompt, mode == "cfg")
            branches = with_image_embeds(branches, image_embeds, mode == "cfg")
        if mode == "guide" and reads_negative:
            branches.negative_rows = self.negative_rows(negative_prompt, negative_prompt_embeds, len(prompt_embeds), num_images_per_prompt, device)

        # 2. initial noise, exactly as StableDiffusionPipeline prepares it
        latents = self.prepare_latents(batch_size * num_images_per_prompt, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents)
        if plan.scheduler is not self.scheduler:  # prepare_latents scaled the noise for self.scheduler
            latents = latents * (plan.scheduler.init_noise_sigma / self.scheduler.init_noise_sigma)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:  # a UNet that embeds w itself (LCM), as diffusers feeds it
            scale = torch.tensor(guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(scale, embedding_dim=self.unet.config.time_cond_proj_dim).to(device=device, dtype=latents.dtype)

        # 3. denoising loop: one model call per timestep, of the plan's kind there
        latents = self.denoise(latents, plan, branches, extra_step_kwargs, timestep_cond, callback_on_step_end,
                               callback_on_step_end_tensor_inputs, callback, callback_steps, cfg_call=mode == "cfg")

        # 4. decode, as StableDiffusionPipeline does
        if output_type == "latent":
            image, has_nsfw_concept = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not nsfw for nsfw in has_nsfw_concept]
        image = image if output_type == "latent" else self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)


def expose_text_model(text_encoder) -> None:
    """diffusers' `clip_skip` reads `text_encoder.text_model.final_layer_norm`, which transformers 5 moved to the model itself:
    an alias (not a submodule: nothing is saved twice) lets the same code run on either layout."""
    if not hasattr(text_encoder, "text_model") and hasattr(text_encoder, "final_layer_norm"):
        object.__setattr__(text_encoder, "text_model", text_encoder)


def legacy_callback(kwargs: dict) -> tuple[Callable | None, int | None]:
    """diffusers' deprecated `callback` and `callback_steps` (still taken through **kwargs); any other keyword is an error."""
    callback, callback_steps = kwargs.pop("callback", None), kwargs.pop("callback_steps", None)
    if kwargs:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(kwargs))}: the pipeline takes diffusers' arguments plus mode and policy")
    return callback, callback_steps


def callback_inputs(callback_on_step_end, tensor_inputs: list[str]) -> list[str]:
    """diffusers' PipelineCallback objects say which tensors they read."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    return callback_on_step_end.tensor_inputs if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)) else tensor_inputs


def check_guide_arguments(mode: str, guide, negative: bool, guidance_rescale: float, ip_adapter_image, ip_adapter_image_embeds) -> None:
    """diffusers arguments that guide mode cannot honour, refused in one line that says why (a negative prompt that this
    guide cannot read: a warning)."""
    if mode != "guide":
        return
    if negative and not guide.reads_negative_prompt:
        warnings.warn("negative_prompt is ignored in guide mode: this guide was distilled against the empty prompt only (it has no "
                      "negative head); use mode='cfg' to apply it, or a guide with a negative head (the default one)", stacklevel=4)
    if guidance_rescale > 0 and not is_output_guide(guide):
        raise ValueError("guidance_rescale rescales CFG's output against the conditional one, which a residual guide never computes: "
                         "use an output guide or mode='cfg'")
    if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
        raise ValueError("guide mode cannot apply an IP-Adapter image: the guide was distilled on text prompts alone, so its "
                         "correction would leave the image's guidance out; use mode='cfg'")


def with_image_embeds(branches: Branches, image_embeds: list[torch.Tensor], cfg: bool) -> Branches:
    """IP-Adapter image embeddings into the branches' added conditioning (diffusers holds them [negative; prompt] for CFG)."""
    if not cfg:
        return replace(branches, added=dict(branches.added or {}, image_embeds=image_embeds))
    halves = [embeds.chunk(2) for embeds in image_embeds]
    return replace(branches, added=dict(branches.added or {}, image_embeds=[h[1] for h in halves]),
                   negative_added=dict(branches.negative_added or {}, image_embeds=[h[0] for h in halves]))


def concat_added(negative: dict | None, positive: dict | None) -> dict | None:
    """Two branches' added conditioning as one batch, [negative; prompt] (IP-Adapter embeddings are lists of tensors)."""
    if positive is None:
        return None
    join = lambda a, b: [torch.cat(pair) for pair in zip(a, b)] if isinstance(b, list) else torch.cat([a, b])  # noqa: E731
    return {key: join(negative[key], value) for key, value in positive.items()}


def select_rows(added: dict | None, rows: torch.Tensor) -> dict | None:
    if added is None:
        return None
    return {key: [v[rows] for v in value] if isinstance(value, list) else value[rows] for key, value in added.items()}


def is_output_guide(guide) -> bool:
    """Whether the guide is an output guide, also when `torch.compile` wrapped it (`pipe.guide = torch.compile(pipe.guide)`)."""
    return isinstance(getattr(guide, "_orig_mod", guide), OutputGuide)


def follow_unet(guide: GuideModel | None, unet) -> GuideModel | None:
    """The guide on the UNet's device and in its dtype (cast in place, as `pipe.to` would): a guide loaded in fp32
    and a UNet loaded in half precision otherwise meet as torch's "mat1 and mat2 must have the same dtype"."""
    if guide is not None and (guide.dtype != unet.dtype or guide.device != unet.device):
        with quiet_casts():
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
    that every skip connection a guide adds to is exactly as large as the decoder tensor it meets."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)


def check_image_size(height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")


REACH = 0.8  # a guide carries to a fine-tune whose distance from its base (measure_lora_distance) is at most this, as measured


@dataclass(frozen=True)
class LoraReach:
    """A LoRA's measured distance from the base (`measure_lora_distance`), for the adapters and scale it was measured at.
    Away from that scale it is read as a power of the scale: measured on the embedded LoRAs between scales 0.5 and 1,
    the distance grows as scale^1.5 to scale^1.9 (docs/findings.md), so the estimate takes the power that gives the
    larger distance: 1.5 below the measured scale, 2 above it."""

    distance: float
    adapters: tuple[str, ...]
    scale: float

    def at(self, adapters: tuple[str, ...], scale: float) -> float | None:
        if adapters != self.adapters or self.scale == 0:
            return None
        ratio = scale / self.scale
        return self.distance * ratio ** (1.5 if ratio < 1 else 2.0)


def _active_lora_layers(unet):
    """(peft LoRA layer, adapter name) for every adapter active in the UNet's enabled LoRA layers."""
    return [(module, name) for module in unet.modules() if hasattr(module, "lora_A") and not getattr(module, "disable_adapters", False)
            for name in module.active_adapters]


def active_lora_adapters(unet) -> tuple[str, ...]:
    return tuple(sorted({name for _, name in _active_lora_layers(unet)}))


def active_lora_scale(unet, cross_attention_kwargs: dict | None = None) -> float:
    """The largest weight any active LoRA adapter of the UNet has in this call (set_adapters' weights times the call's
    `cross_attention_kwargs["scale"]`); 0 without LoRA weights, or with them disabled or at weight 0."""
    if not getattr(unet, "peft_config", None):
        return 0.0
    weights = [module.scaling[name] / (module.lora_alpha[name] / module.r[name]) for module, name in _active_lora_layers(unet)
               if name in module.scaling and module.r.get(name)]
    scale = (cross_attention_kwargs or {}).get("scale", 1.0)
    return float(max((abs(w) for w in weights), default=0.0) * scale)


def warn_lora_reach(unet, cross_attention_kwargs: dict | None, reach: LoraReach | None) -> None:
    """A guide distilled on the base carries to a fine-tune only while the fine-tune's CFG images stay near the base's:
    on the embedded model the default guide closed 0.62-0.81 of a fine-tune's own CFG gap up to distance 0.41 and
    0.19-0.43 from 1.1 on (docs/findings.md). Warns when the measured distance at this call's scale is beyond REACH, or when no
    distance has been measured for the active adapters; LoRA weights at scale 0 change nothing and are not warned about."""
    scale = active_lora_scale(unet, cross_attention_kwargs)
    if scale == 0:
        return
    distance = reach.at(active_lora_adapters(unet), scale) if reach is not None else None
    beyond = ("use mode='cfg' with a policy fitted on this model (pnpguide fit-carry --lora DIR; Adaptive Guidance 0.995 + "
              "carry)")
    if distance is None:
        warnings.warn(f"LoRA weights are active (scale {scale:g}) and their distance from the base is not measured: a guide "
                      f"distilled on the base carries to a fine-tune only near it (distance <= {REACH:g}); measure it with "
                      f"pipe.measure_lora_distance(prompts) or pnpguide doctor --lora DIR, and beyond that {beyond}", stacklevel=5)
    elif distance > REACH:
        warnings.warn(f"LoRA weights are active (scale {scale:g}) at distance {distance:.2f} from the base, beyond the guide's "
                      f"reach ({REACH:g}): its images will stay far from this model's CFG; {beyond}", stacklevel=5)


def gives_negative(negatives: tuple) -> bool:
    """Whether a call's negative prompt arguments hold a negative: embeddings, or a prompt that is not empty."""
    texts = lambda n: [n] if isinstance(n, str) else n if isinstance(n, list) else None  # noqa: E731
    return any(n is not None and (texts(n) is None or any(texts(n))) for n in negatives)


def first_call_after(timesteps: list, steps: int) -> int:
    """Index of the first model call after the first `steps` distinct timesteps (PNDM and Heun call the model
    twice at some timesteps: both calls belong to one step)."""
    distinct = list(dict.fromkeys(timesteps))
    if steps >= len(distinct):
        return len(timesteps)
    return timesteps.index(distinct[steps])
