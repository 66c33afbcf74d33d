"""Stage 2, step distillation of the guide: each round halves the number of DDIM steps (e.g. 32 -> 16 -> 8).

Progressive distillation (Salimans & Ho 2022, Algorithm 2; Meng et al. 2023, stage two): the student
learns to land, in one DDIM step, where its teacher lands in two. Only the guide is trained, the base
UNet stays frozen, so the step-distilled guide still plugs into fine-tunes. w stays an input. Every
student starts from the stage-1 guide or the previous student. The first teacher is true CFG (the stage-1
guide's own error is not passed on); each later round is taught by the previous student. The states are a source's clean latents
(images, shapes, or the final latents of CFG teacher runs from prompts: see `sources.teacher_trajectories`)
noised onto the student's timesteps. A stage-1 guide that reads negative prompts keeps them: its teachers and
students see the same per-sample negatives as stage 1 drew (:mod:`pnpguide.negatives`); a negative head runs on the
samples whose negative is not empty, as in the pipeline. A guide distilled on the first steps only (then carried on)
becomes a guide for every step of the student's grid. Each student records its grid (`trained_timesteps`), and the
pipeline samples it there.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import DDIMScheduler

from .conditioning import Conditioning, cfg_added_cond_kwargs, encode_negative, encode_negatives, encode_prompts
from .distill_guidance import check_guidance_range, freeze, sample_guidance_scales
from .guides import GuideModel
from .loading import default_guide_dir, load_guide, load_pipeline
from .model_card import write_model_card
from .negatives import NegativeSampler, check_negative_settings
from .sources import BaseData, SourceConfig, training_pools, training_resolution
from .teacher import cfg_noise_pred, guided_noise_pred
from .run_folder import training_run
from .training import copy_ema_into, make_accelerator, run_training, shard_rows



@dataclass
class StepDistillConfig(SourceConfig):
    SOURCES: ClassVar[tuple[str, ...]] = ("shapes", "trajectories", "images")  # no "mix": students learn on clean latents noised onto their grid

    output_dir: str = "runs/steps"
    base: str | None = None  # SD or SDXL folder (default: the embedded model)
    guide: str | None = None  # stage-1 guide to start from (default: the shipped default guide)
    teacher_steps: int = 32  # DDIM steps of the first teacher, true CFG
    student_steps: int = 8  # stop when a student samples in this many steps
    w_min: float = 2.0  # guidance scales are drawn uniformly from [w_min, w_max]
    w_max: float = 9.0  # upper end of that range (diffusers' convention)
    num_samples: int = 10000  # shapes: images whose latents are noised onto the student's timesteps
    max_steps: int = 400  # optimizer steps per halving round
    learning_rate: float = 2e-4
    lr_warmup_steps: int = 20
    checkpointing_steps: int = 200
    negative_prompts: str | None = None  # a guide that reads negative prompts: also draw negatives from this file (see distill --negatives)
    negative_rate: float = 0.5  # a guide that reads negative prompts: the share of samples with a non-empty negative

    def __post_init__(self):
        super().__post_init__()
        check_negative_settings(self.negative_prompts, self.negative_rate)
        n = self.teacher_steps
        while n > self.student_steps:
            n //= 2
        if n != self.student_steps or self.student_steps < 1:
            raise ValueError(f"student_steps ({self.student_steps}) must be teacher_steps ({self.teacher_steps}) halved one or more times")
        check_guidance_range(self.w_min, self.w_max)


def step_schedule(scheduler_config, num_steps: int) -> torch.Tensor:
    """The timesteps a DDIM sampler with this config evaluates the model at in `num_steps` steps."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps


def next_timestep(t: torch.Tensor, num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """Where DDIMScheduler.step goes from t (t - T // steps); -1 stands for the end of sampling."""
    t_next = t - num_train_timesteps // num_steps
    return torch.where(t_next >= 0, t_next, torch.full_like(t_next, -1))


def _alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor, final_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) timesteps -> alpha_t, sigma_t shaped (B, 1, 1, 1); t = -1 is the end of sampling."""
    a = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.tensor(final_alpha))
    return a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)


def predicted_x0(model_output, sample, alpha, sigma, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use epsilon or v_prediction")


def ddim_step(x0, sample, alpha, sigma, alpha_next, sigma_next) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): keep the implied noise, move to the next noise level."""
    eps = (sample - alpha * x0) / sigma
    return alpha_next * x0 + sigma_next * eps


@dataclass
class Denoiser:
    """UNet + a guide (or CFG, guide=None) as one x0-predictor at a given noise level (k-diffusion's wrapper idea)."""

    unet: torch.nn.Module
    scheduler_config: dict
    negative: Conditioning  # one row: CFG's unconditional branch

    def x0(self, guide, sample, t, conditioning: Conditioning, w, alpha, sigma, negative: Conditioning | None = None,
           negative_rows: torch.Tensor | None = None) -> torch.Tensor:
        """`negative`: B rows of per-sample negatives (default: the empty prompt's row for all); `negative_rows`: which
        of them are not the empty prompt (a negative head runs on those only, as in the pipeline; None: none)."""
        negative = (self.negative if negative is None else negative).rows_for(len(conditioning))
        if guide is None:
            added = cfg_added_cond_kwargs(conditioning, negative)
            output = cfg_noise_pred(self.unet, sample, t.clamp(min=0), conditioning.prompt_embeds, negative.prompt_embeds, w, added)
        else:
            head = getattr(getattr(guide, "module", guide).config, "negative_head", False)
            negative_embeds = None if head and negative_rows is None else negative.prompt_embeds
            output = guided_noise_pred(self.unet, guide, sample, t.clamp(min=0), conditioning.prompt_embeds, w, conditioning.added_cond_kwargs(),
                                       negative_prompt_embeds=negative_embeds, negative_rows=negative_rows if head else None)
        return predicted_x0(output.float(), sample, alpha, sigma, self.scheduler_config["prediction_type"])


def teacher_target(denoiser: Denoiser, teacher: GuideModel, batch: dict, schedule, final_alpha: float) -> torch.Tensor:
    """x0 target: the x0 that takes the student from t to where two teacher steps (t -> mid -> next) land.

    Salimans & Ho (2022), Algorithm 2: x~ = (z_next - (sigma_next / sigma_t) z_t) / (alpha_next - (sigma_next / sigma_t) alpha_t).
    """
    acp = schedule["alphas_cumprod"]
    z, t, mid, nxt = batch["sample"], batch["t"], batch["t_mid"], batch["t_next"]
    a_t, s_t = _alpha_sigma(acp, t, final_alpha)
    a_mid, s_mid = _alpha_sigma(acp, mid, final_alpha)
    a_next, s_next = _alpha_sigma(acp, nxt, final_alpha)
    negative = {"negative": batch.get("negative"), "negative_rows": batch.get("negative_rows")}
    with torch.no_grad():
        z_mid = ddim_step(denoiser.x0(teacher, z, t, batch["conditioning"], batch["w"], a_t, s_t, **negative), z, a_t, s_t, a_mid, s_mid)
        last = mid < 0  # the teacher's first step already ended sampling
        x0_mid = denoiser.x0(teacher, z_mid, mid, batch["conditioning"], batch["w"], a_mid, s_mid, **negative)
        z_next = torch.where(last.view(-1, 1, 1, 1), z_mid, ddim_step(x0_mid, z_mid, a_mid, s_mid, a_next, s_next))
    ratio = s_next / s_t
    return (z_next - ratio * z) / (a_next - ratio * a_t)


def student_loss(denoiser: Denoiser, student, teacher, batch: dict, schedule, final_alpha: float) -> torch.Tensor:
    """x0-space MSE with truncated-SNR weights max(SNR, 1) (Salimans & Ho 2022, sec. 4)."""
    target = teacher_target(denoiser, teacher, batch, schedule, final_alpha)
    a_t, s_t = _alpha_sigma(schedule["alphas_cumprod"], batch["t"], final_alpha)
    prediction = denoiser.x0(student, batch["sample"], batch["t"], batch["conditioning"], batch["w"], a_t, s_t, batch.get("negative"),
                             batch.get("negative_rows"))
    weight = torch.clamp(a_t**2 / s_t**2, min=1.0)
    return (weight * (prediction - target) ** 2).mean()


def _round_batch(rows, scheduler, student_grid, steps: int, config, generator) -> dict:
    """Clean latents noised onto a random student timestep, with the teacher's midpoint and the student's next step."""
    n = len(rows.latents)
    t = student_grid[torch.randint(len(student_grid), (n,), generator=generator)]
    total = scheduler.config.num_train_timesteps
    t_mid, t_next = next_timestep(t, total, 2 * steps), next_timestep(t, total, steps)
    noise = torch.randn(rows.latents.shape, generator=generator)
    sample = scheduler.add_noise(rows.latents, noise, t)
    w = sample_guidance_scales(n, config.w_min, config.w_max, generator)
    return {"sample": sample, "t": t, "t_mid": t_mid, "t_next": t_next, "w": w}


@training_run
def distill_steps(config: StepDistillConfig, base_data: BaseData | None = None) -> dict[int, Path]:
    """Run the halving rounds; save each student to `output_dir/guide-<steps>`; return {steps: folder}. `base_data`: the
    base's own images and captions, for a run given neither --prompts nor --images (the embedded base's: ShapesData)."""
    accelerator = make_accelerator(config)  # for the device and rank; each round's loop prepares its own (one model each)
    stage1 = load_guide(config.guide or default_guide_dir()).eval().requires_grad_(False)
    if config.negative_prompts is not None and not stage1.reads_negative_prompt:
        raise ValueError("--negative-prompts: this stage-1 guide does not read negative prompts (give it a negative head first: "
                         "pnpguide distill --init-guide ... --negative-head)")
    pipe = load_pipeline(config.base)
    freeze(pipe)
    pipe.to(accelerator.device)
    stage1.check_compatible(pipe.unet)
    stage1.check_text_encoder(pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    stage1.to(accelerator.device)
    negatives = NegativeSampler.from_config(config) if stage1.reads_negative_prompt else None
    (pool,) = training_pools(pipe, config, accelerator, record="samples", data_seed=config.seed + 13, base_data=base_data)
    resolution = training_resolution(pipe, config)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)  # students sample with DDIM, whatever the base ships
    schedule_config = {key: value for key, value in ddim.config.items() if not key.startswith("_")}
    denoiser = Denoiser(pipe.unet, schedule_config, encode_negative(pipe, accelerator.device, resolution))
    schedule = {"alphas_cumprod": ddim.alphas_cumprod.float().to(accelerator.device)}
    final_alpha = float(ddim.final_alpha_cumprod)
    saved, steps, teacher = {}, config.teacher_steps, None  # None: true CFG teaches the first round
    while steps > config.student_steps:
        steps //= 2
        student_grid = step_schedule(ddim.config, steps)
        student = copy.deepcopy(stage1 if teacher is None else teacher).train().requires_grad_(True)
        round_config = dataclasses.replace(config, output_dir=str(Path(config.output_dir) / f"round-{steps}"))

        def make_batch(step, generator, student_grid=student_grid, steps=steps):
            rows = pool.rows(shard_rows(len(pool), config.batch_size, step, config.seed, accelerator.process_index, accelerator.num_processes))
            batch = {k: v.to(accelerator.device) for k, v in _round_batch(rows, ddim, student_grid, steps, config, generator).items()}
            batch["conditioning"] = encode_prompts(pipe, rows.prompts, accelerator.device, resolution)
            if negatives is not None:
                drawn = negatives.draw(list(rows.prompts), generator)
                batch["negative"] = encode_negatives(pipe, drawn, denoiser.negative, accelerator.device, resolution)
                batch["negative_rows"] = torch.tensor([bool(negative) for negative in drawn], device=accelerator.device)
            return batch

        def compute_loss(model, batch, teacher=teacher):
            return student_loss(denoiser, model, teacher, batch, schedule, final_alpha)

        student, ema = run_training(round_config, student, make_batch, compute_loss, description=f"distill-steps {steps * 2}->{steps}")
        student = copy_ema_into(student, ema).eval().requires_grad_(False)
        student.register_to_config(trained_timesteps=tuple(int(t) for t in student_grid), trained_guidance_range=(config.w_min, config.w_max),
                                   trained_schedule=schedule_config)
        if hasattr(student.config, "trained_first_steps"):  # it learnt every step of its grid: no carry
            student.register_to_config(trained_first_steps=None, negative_first_steps=None)
        student.correction_carry = None
        saved[steps] = Path(config.output_dir) / f"guide-{steps}"
        if accelerator.is_main_process:  # ranks hold the same weights; concurrent writes could interleave
            student.save_pretrained(saved[steps], safe_serialization=True)
            write_model_card(saved[steps], student, config, "distill-steps")
        teacher = student
    accelerator.wait_for_everyone()  # every rank returns once the students are on disk
    return saved
