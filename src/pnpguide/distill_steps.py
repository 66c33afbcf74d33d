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

With an explicit student grid (`student_timesteps`, e.g. denser near t = 999 where the trajectory bends), there is
one round instead of halvings: the teacher is true CFG on its DDIM grid at `teacher_steps`, run from noise over the
prompts (`sources.teacher_trajectories`, every state recorded with CFG's two outputs), and the student learns each
segment t_i -> t_{i+1} of its grid (a subset of the teacher's) from where a teacher run is at t_i to where the same
run is at t_{i+1}: the teacher's many steps between them in one of the student's. `unguided_below` leaves the
student's steps below that t to the plain UNet when no negative prompt is given (its `default_guidance_interval`);
those segments are learnt on the runs with a negative only, where the pipeline guides every step.
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
from .grid_scheduler import check_timestep_grid
from .guides import GuideModel, OutputGuide
from .loading import default_guide_dir, load_guide, load_pipeline
from .model_card import write_model_card
from .negatives import NegativeSampler, check_negative_settings
from .sources import BaseData, SourceConfig, read_prompt_file, teacher_trajectories, training_pools, training_resolution
from .teacher import cfg_combine, cfg_noise_pred, guided_noise_pred, output_guided
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
    negative_prompts: str | None = None  # a guide with a negative head: also draw negatives from this file
    negative_rate: float = 0.5  # a guide that reads negative prompts: the share of samples with a non-empty negative
    student_timesteps: list[int] | None = None  # an explicit student grid instead of halvings: descending timesteps, one per UNet call, all on the teacher's DDIM grid at --teacher-steps; one round, taught by CFG's own runs (--trajectories of them)
    unguided_below: int | None = None  # with --student-timesteps: without a negative prompt the student guides only at t >= this (its default_guidance_interval); the segments from below it are learnt on runs with a negative only
    segment_repeats: list[int] | None = None  # with --student-timesteps: how many times each segment's rows are drawn per pass (one per grid timestep; default: once each), to spend more of training where the images need it
    teacher_runs: str | None = None  # with --student-timesteps: folder for the teacher's runs (default: OUTPUT_DIR/teacher-runs); students of the same teacher, prompts, w range, seed and negatives can share it

    def __post_init__(self):
        super().__post_init__()
        check_negative_settings(self.negative_prompts, self.negative_rate)
        if self.student_timesteps is not None:
            check_timestep_grid(self.student_timesteps, self.teacher_steps * 10**6)  # descending, >= 0; the base's range once it loads
            if self.source not in ("trajectories", "shapes") or self.images is not None:
                raise ValueError("--student-timesteps learns from the CFG teacher's runs over --prompts (or the shapes captions), not from --images")
            if self.unguided_below is not None and not 0 < self.unguided_below <= max(self.student_timesteps):
                raise ValueError(f"unguided_below must be in (0, {max(self.student_timesteps)}] (the grid's first timestep), got {self.unguided_below}")
            if self.segment_repeats is not None and (len(self.segment_repeats) != len(self.student_timesteps) or min(self.segment_repeats) < 0
                                                     or max(self.segment_repeats) < 1):
                raise ValueError(f"segment_repeats needs one count >= 0 per student timestep ({len(self.student_timesteps)}), some > 0; got {self.segment_repeats}")
            check_guidance_range(self.w_min, self.w_max)
            return
        if self.unguided_below is not None or self.teacher_runs is not None or self.segment_repeats is not None:
            raise ValueError("--unguided-below, --segment-repeats and --teacher-runs go with --student-timesteps")
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


@dataclass
class GridSegments:
    """The teacher's runs cut at the student's grid. For segment i (grid[i] -> grid[i + 1], the last to the end) and run
    n: where the run is at grid[i] (`starts[i, n]`, with the UNet's conditional output there, which an output guide
    reads), and where the same run is at the segment's end (`ends[i, n]`). `pairs`: the (segment, run) rows trained on."""

    grid: list[int]
    starts: torch.Tensor  # (S, N, C, h, w)
    conditional: torch.Tensor  # (S, N, C, h, w)
    unconditional: torch.Tensor  # (S, N, C, h, w): CFG's other pass there (with the run's negative), for diagnostics
    ends: torch.Tensor  # (S, N, C, h, w)
    prompts: list[str]  # N
    w: torch.Tensor  # (N,)
    negatives: list[str] | None  # N, "" for none; None: recorded without negatives
    pairs: torch.Tensor  # (R, 2) long

    def next_timesteps(self) -> torch.Tensor:
        return torch.tensor(self.grid[1:] + [-1])


def grid_segments(pool, teacher: DDIMScheduler, grid: list[int], unguided_below: int | None = None,
                  repeats: list[int] | None = None) -> GridSegments:
    """`pool`: the teacher's runs (`teacher_trajectories(record="states")` on `teacher`'s grid, every step), read once into
    memory at the grid's timesteps only. The end of the last segment is the teacher's final step, from the recorded
    outputs at its last state. Segments from below `unguided_below` keep only the runs with a negative prompt; segment i's
    (segment, run) rows are listed `repeats[i]` times (default once)."""
    from safetensors.torch import load_file

    teacher_grid = teacher.timesteps.tolist()
    missing = [t for t in grid if t not in teacher_grid]
    if missing:
        raise ValueError(f"student timesteps {missing} are not on the teacher's DDIM grid at {len(teacher_grid)} steps: "
                         f"pick them from {teacher_grid}")
    positions, steps = [teacher_grid.index(t) for t in grid], len(teacher_grid)
    parts: dict[str, list] = {"starts": [], "conditional": [], "unconditional": [], "finals": [], "prompt_ids": [], "w": [], "negative_ids": []}
    for file in pool.files:
        shard = load_file(str(file))
        n = len(shard["prompt_ids"]) // steps
        by_step = {name: shard[name].view(steps, n, *shard[name].shape[1:]) for name in ("latents", "conditional", "unconditional")}
        w = shard["guidance"][:n]
        last = cfg_combine(by_step["unconditional"][-1], by_step["conditional"][-1], w)
        parts["finals"].append(teacher.step(last, teacher_grid[-1], by_step["latents"][-1]).prev_sample)
        parts["starts"].append(by_step["latents"][positions])
        parts["conditional"].append(by_step["conditional"][positions])
        parts["unconditional"].append(by_step["unconditional"][positions])
        parts["prompt_ids"].append(shard["prompt_ids"][:n])
        parts["w"].append(w)
        if "negative_ids" in shard:
            parts["negative_ids"].append(shard["negative_ids"][:n])
    starts = torch.cat(parts["starts"], dim=1)
    ends = torch.cat([starts[1:], torch.cat(parts["finals"])[None]])
    prompts = [pool.prompts[i] for i in torch.cat(parts["prompt_ids"]).tolist()]
    negatives = [pool.negatives[i] for i in torch.cat(parts["negative_ids"]).tolist()] if parts["negative_ids"] else None
    with_negative = torch.tensor([bool(n) for n in negatives]) if negatives is not None else torch.zeros(len(prompts), dtype=torch.bool)
    pairs = []
    for segment, t in enumerate(grid):
        runs = torch.arange(len(prompts)) if unguided_below is None or t >= unguided_below else with_negative.nonzero().flatten()
        pairs.append(torch.stack([torch.full_like(runs, segment), runs], dim=1).repeat(repeats[segment] if repeats else 1, 1))
    return GridSegments(list(grid), starts, torch.cat(parts["conditional"], dim=1), torch.cat(parts["unconditional"], dim=1), ends, prompts,
                        torch.cat(parts["w"]), negatives, torch.cat(pairs))


def segment_target(batch: dict, schedule, final_alpha: float) -> torch.Tensor:
    """The x0 whose one DDIM step from `sample` at `t` lands on `end` at `t_next` (Salimans & Ho 2022, Algorithm 2)."""
    acp, z = schedule["alphas_cumprod"], batch["sample"]
    a_t, s_t = _alpha_sigma(acp, batch["t"], final_alpha)
    a_next, s_next = _alpha_sigma(acp, batch["t_next"], final_alpha)
    ratio = s_next / s_t
    return (batch["end"] - ratio * z) / (a_next - ratio * a_t)


def _output_student(student, batch: dict, negative, negative_rows) -> torch.Tensor:
    """An output guide's step from the recorded conditional output. A negative head runs on the rows with a negative
    only (the pipeline's rule; the head's output is zero on the others anyway), so those rows go in a second call."""
    unwrapped = getattr(student, "module", student)
    z, cond, t, w, embeds = batch["sample"], batch["conditional"], batch["t"], batch["w"], batch["conditioning"].prompt_embeds
    if not unwrapped.config.negative_head or negative is None or negative_rows is None:
        return output_guided(student, cond, z, t, embeds, w, None if negative is None or unwrapped.config.negative_head else negative.prompt_embeds)
    output = torch.empty_like(cond)
    for rows, with_negative in ((negative_rows, True), (~negative_rows, False)):
        if rows.any():
            output[rows] = output_guided(student, cond[rows], z[rows], t[rows], embeds[rows], w[rows],
                                         negative.prompt_embeds[rows] if with_negative else None)
    return output


def grid_student_loss(denoiser: Denoiser, student, batch: dict, schedule, final_alpha: float) -> torch.Tensor:
    """x0-space MSE with truncated-SNR weights max(SNR, 1), as :func:`student_loss`; the target is the x0 whose one DDIM
    step from the segment's start lands where the teacher's run is at its end (:func:`segment_target`). An output
    guide reads the UNet's conditional output recorded with the state (no UNet call)."""
    z, t = batch["sample"], batch["t"]
    a_t, s_t = _alpha_sigma(schedule["alphas_cumprod"], t, final_alpha)
    target = segment_target(batch, schedule, final_alpha)
    negative, negative_rows = batch.get("negative"), batch.get("negative_rows")
    unwrapped = getattr(student, "module", student)
    if isinstance(unwrapped, OutputGuide):
        output = _output_student(student, batch, negative, negative_rows)
        prediction = predicted_x0(output.float(), z, a_t, s_t, denoiser.scheduler_config["prediction_type"])
    else:
        prediction = denoiser.x0(student, z, t, batch["conditioning"], batch["w"], a_t, s_t, negative, negative_rows)
    weight = torch.clamp(a_t**2 / s_t**2, min=1.0)
    return (weight * (prediction - target) ** 2).mean()


def _encoded_once(texts: list[str], encode, chunk: int = 256):
    """(Conditioning of each distinct text, (len(texts),) index of each text's row in it)."""
    distinct = sorted(set(texts))
    row = {text: i for i, text in enumerate(distinct)}
    parts = [encode(distinct[i : i + chunk]) for i in range(0, len(distinct), chunk)]
    table = Conditioning(*(None if first is None else torch.cat([dataclasses.astuple(part)[k] for part in parts])
                           for k, first in enumerate(dataclasses.astuple(parts[0]))))
    return table, torch.tensor([row[text] for text in texts])


def _distill_grid(config: StepDistillConfig, accelerator, stage1: GuideModel, pipe, ddim: DDIMScheduler, schedule_config: dict,
                  denoiser: Denoiser, negatives: NegativeSampler | None, resolution: int, base_data: BaseData | None) -> dict[int, Path]:
    """One round on `config.student_timesteps`, taught by the CFG teacher's runs (see the module)."""
    grid = check_timestep_grid(config.student_timesteps, ddim.config.num_train_timesteps)
    teacher = DDIMScheduler.from_config(ddim.config)
    teacher.set_timesteps(config.teacher_steps)
    if any(t not in teacher.timesteps.tolist() for t in grid):  # before the teacher's runs: they take a while
        raise ValueError(f"student timesteps must lie on the teacher's DDIM grid at {config.teacher_steps} steps: {teacher.timesteps.tolist()}")
    if config.prompts is None and base_data is None:
        raise ValueError("--student-timesteps without --prompts runs the teacher over the base's own captions: on the embedded base, "
                         "pass base_data=pnpguide.embedded.source.ShapesData() (the CLI does)")
    prompts = read_prompt_file(config.prompts) if config.prompts else base_data.captions(config.num_samples, config.seed + 7)
    runs_config = dataclasses.replace(config, trajectory_steps=config.teacher_steps)
    folder = Path(config.teacher_runs) if config.teacher_runs else Path(config.output_dir) / "teacher-runs"
    pool = teacher_trajectories(pipe, prompts, folder, runs_config, accelerator, "states", None, negatives)
    segments = grid_segments(pool, teacher, grid, config.unguided_below, config.segment_repeats)
    next_timesteps = segments.next_timesteps()
    schedule = {"alphas_cumprod": ddim.alphas_cumprod.float().to(accelerator.device)}
    final_alpha = float(ddim.final_alpha_cumprod)
    student = copy.deepcopy(stage1).train().requires_grad_(True)
    # every run's prompt (and negative: the one it sampled CFG with) encoded once: rows are fixed-length, so batching
    # does not change them, and re-encoding them at every step took a third of it
    prompts_table, prompt_of_run = _encoded_once(segments.prompts, lambda texts: encode_prompts(pipe, texts, accelerator.device, resolution))
    with_negatives = stage1.reads_negative_prompt and segments.negatives is not None
    if with_negatives:
        negatives_table, negative_of_run = _encoded_once(
            segments.negatives, lambda texts: encode_negatives(pipe, texts, denoiser.negative, accelerator.device, resolution))
        has_negative = torch.tensor([bool(negative) for negative in segments.negatives])

    def make_batch(step, generator):
        rows = segments.pairs[shard_rows(len(segments.pairs), config.batch_size, step, config.seed, accelerator.process_index,
                                         accelerator.num_processes)]
        segment, run = rows[:, 0], rows[:, 1]
        batch = {"sample": segments.starts[segment, run], "conditional": segments.conditional[segment, run], "end": segments.ends[segment, run],
                 "t": torch.tensor(grid)[segment], "t_next": next_timesteps[segment], "w": segments.w[run]}
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        batch["conditioning"] = prompts_table._map(lambda x: x[prompt_of_run[run].to(x.device)])
        if with_negatives:
            batch["negative"] = negatives_table._map(lambda x: x[negative_of_run[run].to(x.device)])
            batch["negative_rows"] = has_negative[run].to(accelerator.device)
        return batch

    def compute_loss(model, batch):
        return grid_student_loss(denoiser, model, batch, schedule, final_alpha)

    round_config = dataclasses.replace(config, output_dir=str(Path(config.output_dir) / f"grid-{len(grid)}"))
    student, ema = run_training(round_config, student, make_batch, compute_loss, description=f"distill-steps grid {grid}")
    student = copy_ema_into(student, ema).eval().requires_grad_(False)
    interval = None if config.unguided_below is None else (float(config.unguided_below), float(ddim.config.num_train_timesteps))
    saved = Path(config.output_dir) / f"guide-{len(grid)}"
    save_student(student, grid, config, schedule_config, interval, saved, accelerator)
    accelerator.wait_for_everyone()
    return {len(grid): saved}


def save_student(student: GuideModel, grid, config: StepDistillConfig, schedule_config: dict, interval, folder: Path, accelerator) -> None:
    """Record what the student learnt (its grid, every step of it: no carry) and save it with a model card."""
    student.register_to_config(trained_timesteps=tuple(int(t) for t in grid), trained_guidance_range=(config.w_min, config.w_max),
                               trained_schedule=schedule_config, default_guidance_interval=interval)
    if isinstance(student, OutputGuide):
        student.register_to_config(trained_first_steps=None, negative_first_steps=None)
    student.correction_carry = None
    if accelerator.is_main_process:  # ranks hold the same weights; concurrent writes could interleave
        student.save_pretrained(folder, safe_serialization=True)
        write_model_card(folder, student, config, "distill-steps")


@training_run
def distill_steps(config: StepDistillConfig, base_data: BaseData | None = None) -> dict[int, Path]:
    """Run the halving rounds (or one round on an explicit grid); save each student to `output_dir/guide-<steps>`; return
    {steps: folder}. `base_data`: the base's own images and captions, for a run given neither --prompts nor --images
    (the embedded base's: ShapesData)."""
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
    resolution = training_resolution(pipe, config)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)  # students sample with DDIM, whatever the base ships
    schedule_config = {key: value for key, value in ddim.config.items() if not key.startswith("_")}
    denoiser = Denoiser(pipe.unet, schedule_config, encode_negative(pipe, accelerator.device, resolution))
    if config.student_timesteps is not None:
        return _distill_grid(config, accelerator, stage1, pipe, ddim, schedule_config, denoiser, negatives, resolution, base_data)
    (pool,) = training_pools(pipe, config, accelerator, record="samples", data_seed=config.seed + 13, base_data=base_data)
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
        saved[steps] = Path(config.output_dir) / f"guide-{steps}"
        save_student(student, student_grid, config, schedule_config, None, saved[steps], accelerator)
        teacher = student
    accelerator.wait_for_everyone()  # every rank returns once the students are on disk
    return saved
