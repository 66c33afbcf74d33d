"""Stage 1, guidance distillation: train only the guide so that one guided UNet pass matches CFG.

For random w ~ U[w_min, w_max], the loss is
    || unet(x_t, t, c, residuals=guide(x_t, t, c, w)) - cfg(x_t, t, c, w) ||^2
with the base UNet frozen (Hsiao et al. 2024, sec. 3.2). The noisy states x_t come from a source of
:mod:`pnpguide.sources`: the teacher's own CFG sampling trajectories (prompts only, and the states the student
will actually meet at inference; the default), data latents (an image folder, or the embedded model's shapes)
noised at a random timestep, or half of each batch from both (`mix`).

The default recipe is the one measured best (docs/method.md): an output guide learns the teacher's first 5 of 25
steps, where CFG's correction changes fastest, and after them its correction is carried on by factors fitted on the
base (:class:`pnpguide.CorrectionCarry`, saved in the guide's folder). `loss_weighting="timestep"` divides each
sample's error by the mean CFG gap of its timestep, measured once before training: the gap at the first, pure-noise
step is tens of times larger than at the others and would otherwise take the whole loss. SDXL bases get their pooled
text embeddings and size time ids through `added_cond_kwargs`, in the teacher's 2B call and the student's B call alike.
With `negative_head`, a trained output guide gets a second head for the negative prompt and only that head trains,
on teacher runs that each sample CFG with a negative drawn for them (:mod:`pnpguide.negatives`): without a negative
the guide stays exactly what it was. With `step_heads`, a trained output guide gets a prompt head of its own for each of
those timesteps, and only those heads train, each on the teacher states at its timestep: the `default` recipe gives the
first guided step (t = 999, the largest correction), the second (whose error costs the image as much) and the last
(whose correction is carried to the end) one each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .conditioning import Conditioning, cfg_added_cond_kwargs, encode_negative, encode_negatives, encode_prompts
from .carry import CorrectionCarry
from .guides import GuideModel, OutputGuide, ResidualGuide, text_encoder_signature
from .model_card import write_model_card
from .loading import load_guide, load_pipeline, lora_dir
from .negatives import NegativeSampler, check_negative_settings
from .shards import Rows
from .sources import BaseData, SourceConfig, training_pools, training_resolution, validation_pool
from .teacher import cfg_and_conditional, cfg_combine, guided_noise_pred, output_guided
from .run_folder import training_run
from .training import copy_ema_into, make_accelerator, run_training, shard_rows

GAP_FLOOR = 1e-3  # added to each band's mean gap, so a band where the prompt barely changes the output cannot dominate
PER_UNIT_GUIDANCE_FLOOR = 1e-2  # (w - 1)^2 is at least this when an output guide's error is divided by it (w near 1: no correction to learn)
LOSS_WEIGHTINGS = ("none", "timestep")
DESIGNS = {"output": OutputGuide, "residual": ResidualGuide}
DEFAULT_FIRST_STEPS = 5  # an output guide trained on trajectories learns these first steps, then its correction is carried
CARRY_FIT_PROMPTS = 16  # prompts the carry is fitted on after training (the factors hardly depend on which)
TIMESTEP_BUCKETS = 20  # "timestep" weighting: the mean CFG gap is measured in this many equal bands of t
GAP_TABLE_BATCHES = 8  # batches the teacher runs on, before training, to measure those means


@dataclass
class GuidanceDistillConfig(SourceConfig):
    EMBEDDED_SOURCE: ClassVar[str] = "trajectories"

    output_dir: str = "runs/guide"
    base: str | None = None  # SD folder whose UNet the guide serves (default: the embedded model)
    lora: str | None = None  # LoRA weights fused into the base: distil (or, with --init-guide, adapt) a guide for that fine-tune, on its own teacher's runs
    design: str = "output"  # "output" (after the UNet, predicts cond - uncond: the recommended design) or "residual" (the paper's: residuals into the UNet's skip connections)
    init_guide: str | None = None  # start from this trained guide (train it further) instead of a new one
    w_min: float = 2.0  # guidance scales are drawn uniformly from [w_min, w_max]
    w_max: float = 9.0  # upper end of that range (diffusers' convention, at most 14)
    loss_weighting: str = "timestep"  # "timestep" (each sample's error over the mean CFG gap at its t) or "none" (plain MSE)
    negative_head: bool = False  # with --init-guide (an output guide): add a head that reads the negative prompt and train only it, on teacher runs with negatives, so the guide without a negative is unchanged
    negative_prompts: str | None = None  # with --negative-head: a text or JSONL file of negative prompts to draw from as well
    step_heads: list[int] | None = None  # with --init-guide (an output guide trained on the first steps): give these of the teacher's steps (0: the first) a head of their own each, started as a copy of the shared one, and train only those heads, each on the states at its step (the default guide's: 0 1 4)
    negative_rate: float = 0.5  # with --negative-head: the share of teacher runs with a non-empty negative (the others: the empty prompt)
    trajectory_first_steps: int | None = None  # source trajectories: train on the first N states of each teacher run, for an output guide that samples those steps and then carries its correction on (default: 5 for an output guide, else every state)
    validation_trajectories: int | None = None  # source trajectories only: this many teacher runs (the same prompts, other noise) held out of training; the loss on their states goes to log.jsonl at every checkpoint, beside the training loss, to show whether more --trajectories would help (default: none)
    max_steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 50
    checkpointing_steps: int = 250

    def __post_init__(self):
        super().__post_init__()
        if self.lora is not None:
            lora_dir(self.lora)  # a missing folder fails before anything loads
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {', '.join(DESIGNS)}, got {self.design!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.source == "mix" and self.batch_size < 2:
            raise ValueError(f"source='mix' takes half of each batch from each pool: batch_size must be >= 2, got {self.batch_size}")
        if self.trajectory_first_steps is None and self.design == "output" and self.source == "trajectories":
            self.trajectory_first_steps = min(DEFAULT_FIRST_STEPS, self.trajectory_steps)  # shorter runs: every step
        check_guidance_range(self.w_min, self.w_max)
        check_trajectory_options(self)
        check_negative_settings(self.negative_prompts, self.negative_rate)
        if self.negative_head and self.init_guide is None:
            raise ValueError("negative_head adds a head for the negative prompt to a trained output guide: give --init-guide DIR "
                         "(train one first with pnpguide distill)")
        if self.step_heads is not None:
            if self.init_guide is None or self.design != "output" or self.source != "trajectories":
                raise ValueError("--step-heads gives a trained output guide heads of its own for some of the teacher's steps: give --init-guide DIR "
                                 "(an output guide) and train on teacher trajectories")
            if self.negative_head:
                raise ValueError("--step-heads and --negative-head train different heads: run them one after the other")
            outside = [step for step in self.step_heads if not 0 <= step < self.trajectory_first_steps]
            if outside:
                raise ValueError(f"--step-heads {outside}: the teacher runs record steps 0 to {self.trajectory_first_steps - 1} "
                                 "(--trajectory-first-steps): choose from those")
        if self.negative_prompts is not None and not self.negative_head:
            raise ValueError("--negative-prompts are drawn for a negative head: pass --negative-head (with --init-guide)")

    @property
    def negatives(self) -> bool:
        """Whether teacher runs and batches draw negative prompts (to train a negative head)."""
        return self.negative_head


def check_guidance_range(w_min: float, w_max: float) -> None:
    if not 1.0 <= w_min <= w_max <= 14.0:
        raise ValueError(f"need 1 <= w_min <= w_max <= 14, got w_min={w_min}, w_max={w_max}")


def check_trajectory_options(config: GuidanceDistillConfig) -> None:
    """trajectory_first_steps and validation_trajectories act on teacher runs: source 'trajectories' only."""
    for name, what in (("trajectory_first_steps", "selects states of the teacher's trajectories"), ("validation_trajectories", "holds out teacher runs")):
        if getattr(config, name) is not None and config.source != "trajectories":
            raise ValueError(f"{name} {what}: use it with source 'trajectories', not {config.source!r}")
    steps, runs = config.trajectory_first_steps, config.validation_trajectories
    if steps is not None and not 1 <= steps <= config.trajectory_steps:
        raise ValueError(f"trajectory_first_steps must be between 1 and trajectory_steps ({config.trajectory_steps}), got {steps}")
    if runs is not None and runs < 1:  # its type is checked with every field's (check_field_types)
        raise ValueError(f"validation_trajectories must be a whole number of teacher runs >= 1, got {runs!r}")


def sample_guidance_scales(count: int, w_min: float, w_max: float, generator: torch.Generator) -> torch.Tensor:
    """(count,) guidance scales w ~ U[w_min, w_max]: the guide learns every w of the range, not a few."""
    return w_min + (w_max - w_min) * torch.rand(count, generator=generator)


def freeze(pipe) -> None:
    """The base stays frozen: eval mode and no gradients (the guide is the only trained part)."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)


def _noisy_batch(rows: Rows, scheduler, config: GuidanceDistillConfig, generator: torch.Generator) -> dict:
    """One pool's part of a batch: x_t, t, w and the prompts, with the teacher's outputs and negatives where recorded."""
    if rows.timesteps is None:  # data: noise clean latents at a uniformly random timestep
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows.latents),), generator=generator)
        sample = scheduler.add_noise(rows.latents, torch.randn(rows.latents.shape, generator=generator), timesteps)
        w = sample_guidance_scales(len(rows.latents), config.w_min, config.w_max, generator)
    else:  # a teacher state, with the teacher's outputs there
        sample, timesteps, w = rows.latents, rows.timesteps, rows.guidance
    return {"sample": sample, "timesteps": timesteps, "guidance_scale": w, "prompts": rows.prompts, "negatives": rows.negatives,
            "unconditional": rows.unconditional, "conditional": rows.conditional}  # data rows: None


def teacher_targets(unet, batch: dict, negative: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """(CFG output, conditional output) at the batch's states: the outputs recorded with teacher states when every
    row has them and the batch's negatives are the ones recorded with them (or it has none: the recorded unconditional
    pass is then the empty prompt's); else one teacher call."""
    conditioning = batch["conditioning"]
    if batch.get("conditional") is not None and ("negative" not in batch or batch.get("recorded_negatives")):
        return cfg_combine(batch["unconditional"], batch["conditional"], batch["guidance_scale"]), batch["conditional"]
    rows = batch.get("negative", negative).rows_for(len(conditioning))
    return cfg_and_conditional(unet, batch["sample"], batch["timesteps"], conditioning.prompt_embeds, rows.prompt_embeds,
                               batch["guidance_scale"], cfg_added_cond_kwargs(conditioning, rows))


def squared_error(a: torch.Tensor, b: torch.Tensor, guidance_scale: torch.Tensor, per_unit_guidance: bool) -> torch.Tensor:
    """Per-sample mean squared error; with `per_unit_guidance`, divided by (w - 1)^2: an output guide's error in
    units of CFG's term cond - uncond, which does not depend on w, so a w = 2 sample teaches that term with the same
    weight as a w = 9 one (in output space it would weigh 1/49 of it)."""
    error = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    if not per_unit_guidance:
        return error
    return error / (guidance_scale.to(error.device).float() - 1).pow(2).clamp_min(PER_UNIT_GUIDANCE_FLOOR)


def distillation_loss(unet, guide, batch: dict, negative: Conditioning, weighting: str = "none",
                      gap_table: "TimestepGaps | None" = None) -> torch.Tensor:
    """MSE between the guided student's and the CFG teacher's output at the same (x_t, t, c, w) (an output guide's
    divided by (w - 1)^2: in units of CFG's term cond - uncond, see :func:`squared_error`); with
    `weighting="timestep"`, over the mean gap at its timestep (`gap_table`, from :func:`timestep_gap_table`).

    batch: `sample` (B, C, h, w), `timesteps` and `guidance_scale` (B,), `conditioning` (B rows), and with negatives
    `negative` (B rows, :func:`encode_negatives`); negative: the one-row unconditional conditioning (:func:`encode_negative`)
    for batches without."""
    conditioning = batch["conditioning"]
    # a negative head reads the batch's negatives only (the pipeline skips it without one): never the empty prompt's row
    negative_embeds = batch["negative"].rows_for(len(conditioning)).prompt_embeds if "negative" in batch else None
    negative_rows = batch.get("negative_rows")
    with torch.no_grad():
        target, conditional = teacher_targets(unet, batch, negative)
    output_guide = isinstance(getattr(guide, "module", guide), OutputGuide)
    if output_guide:  # the teacher's conditional output is the student's UNet call
        prediction = output_guided(guide, conditional, batch["sample"], batch["timesteps"], conditioning.prompt_embeds,
                                   batch["guidance_scale"], negative_embeds, negative_rows)
    else:
        prediction = guided_noise_pred(unet, guide, batch["sample"], batch["timesteps"], conditioning.prompt_embeds, batch["guidance_scale"],
                                       conditioning.added_cond_kwargs())
    error = squared_error(prediction, target, batch["guidance_scale"], output_guide)
    if weighting == "none":
        return error.mean()
    return (error / gap_table.at(batch["timesteps"]).to(error.device)).mean()


def timestep_bucket(timesteps: torch.Tensor, num_train_timesteps: int, buckets: int = TIMESTEP_BUCKETS) -> torch.Tensor:
    """(B,) timesteps -> their band of t, 0 .. buckets - 1."""
    return (timesteps.long() * buckets // num_train_timesteps).clamp(0, buckets - 1).cpu()


@dataclass
class TimestepGaps:
    """The mean CFG gap per band of t (plus GAP_FLOOR), which `weighting="timestep"` divides by."""

    means: torch.Tensor  # (buckets,)
    num_train_timesteps: int

    def at(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.means[timestep_bucket(timesteps, self.num_train_timesteps, len(self.means))]


@torch.no_grad()
def timestep_gap_table(unet, batches: list[dict], negative: Conditioning, num_train_timesteps: int,
                       buckets: int = TIMESTEP_BUCKETS, per_unit_guidance: bool = False, reduce=None) -> TimestepGaps:
    """The mean CFG gap ||cfg - cond||^2 per band of t (`buckets` bands), measured on `batches`; with
    `per_unit_guidance` (an output guide), of ||cond - uncond||^2, the unit its loss is measured in (:func:`squared_error`).

    Why: the gap at the first, pure-noise step is tens of times larger than at the others, so a plain MSE is spent
    there (docs/findings.md); dividing by the mean gap of a sample's own timestep gives every
    band the same weight, without the noise of dividing by each sample's own gap. The table is measured once,
    up front, on batches drawn from the run's seed, so a resumed run divides by the same numbers. A band with no
    sample takes the nearest measured band's mean. `reduce` sums a tensor over data-parallel ranks, each of which
    measured its own rows of the batches: every rank then divides by the table of all the rows, as one process would."""
    total, count = torch.zeros(buckets, dtype=torch.float64), torch.zeros(buckets, dtype=torch.float64)
    for batch in batches:
        target, conditional = teacher_targets(unet, batch, negative)
        gap = squared_error(conditional, target, batch["guidance_scale"], per_unit_guidance).double().cpu()
        bands = timestep_bucket(batch["timesteps"], num_train_timesteps, buckets)
        total.index_add_(0, bands, gap)
        count.index_add_(0, bands, torch.ones_like(gap))
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    measured = (count > 0).nonzero().flatten()
    if len(measured) == 0:
        raise ValueError("no training states to measure the CFG gap on")
    nearest = measured[(torch.arange(buckets)[:, None] - measured[None]).abs().argmin(1)]
    return TimestepGaps((total[nearest] / count[nearest]).float() + GAP_FLOOR, num_train_timesteps)


def _initial_guide(pipe, config: GuidanceDistillConfig) -> GuideModel:
    if config.init_guide is None:
        torch.manual_seed(config.seed)  # the guide's initial weights depend on the seed alone, not on earlier RNG use
        return DESIGNS[config.design].from_unet(pipe.unet)
    guide = load_guide(config.init_guide)  # trained further only on the base it was made for: same UNet widths and text encoders
    guide.check_compatible(pipe.unet)
    guide.check_text_encoder(pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    if not isinstance(guide, DESIGNS[config.design]):
        raise ValueError(f"the guide in {config.init_guide} is a {type(guide).__name__}, not the --design {config.design} one")
    if config.negative_head:  # the trained guide stays as it is; only its new head for the negative prompt learns
        if not isinstance(guide, OutputGuide):
            raise ValueError(f"--negative-head adds a head to an output guide; the guide in {config.init_guide} is a {type(guide).__name__}")
        guide = guide.with_negative_head().train().requires_grad_(False)
        guide.negative_output_head.requires_grad_(True)
        return guide
    if config.step_heads is not None:  # the rest of the guide stays as it is; only the new heads learn
        if not isinstance(guide, OutputGuide):
            raise ValueError(f"--step-heads adds heads to an output guide; the guide in {config.init_guide} is a {type(guide).__name__}")
        guide = guide.with_step_heads(step_head_timesteps(pipe, config)).train().requires_grad_(False)
        guide.step_output_heads.requires_grad_(True)
        return guide
    return guide.train().requires_grad_(True)


def step_head_timesteps(pipe, config: GuidanceDistillConfig) -> list[int]:
    """The teacher's timesteps at the steps `--step-heads` names (its DDIM grid of `trajectory_steps`)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.trajectory_steps)
    return [int(scheduler.timesteps[step]) for step in config.step_heads]


def _split(batch_size: int, parts: int) -> list[int]:
    """`batch_size` rows over `parts` pools, as evenly as possible."""
    return [batch_size // parts + (i < batch_size % parts) for i in range(parts)]


@training_run
def train_guide(config: GuidanceDistillConfig, base_data: BaseData | None = None) -> GuideModel:
    """Distill CFG into a new guide for `config.base`; saves it to `output_dir/guide` and returns it. `base_data`: the
    base's own images and captions, for a run given neither --prompts nor --images (the embedded base's: ShapesData).

    Runs as one process or data-parallel under `accelerate launch`: the ranks collect disjoint shards of
    the training states, all read the same pools, and :func:`shard_rows` gives them disjoint rows at each step.
    """
    accelerator = make_accelerator(config)
    pipe = load_pipeline(config.base, config.lora)
    if config.lora is not None:
        pipe.fuse_lora()  # the teacher and the guide's UNet are the fine-tune's, one set of weights
    freeze(pipe)
    pipe.to(accelerator.device)  # the text encoders run per batch; the VAE encodes image folders up front
    guide = _initial_guide(pipe, config)
    negatives = NegativeSampler.from_config(config) if config.negatives else None
    pools = training_pools(pipe, config, accelerator, record="states", data_seed=config.seed + 7, base_data=base_data,
                           first_steps=config.trajectory_first_steps,
                           negatives=negatives)
    if config.step_heads is not None:
        pools = [pool.at_timesteps(guide.config.step_heads) for pool in pools]
    resolution = training_resolution(pipe, config)
    negative = encode_negative(pipe, accelerator.device, resolution)

    def make_batch(batch_index, generator):
        rank, world_size = accelerator.process_index, accelerator.num_processes
        parts = []
        for pool, size in zip(pools, _split(config.batch_size, len(pools))):
            rows = shard_rows(len(pool), size, batch_index, config.seed, rank, world_size)
            parts.append(_noisy_batch(pool.rows(rows), pipe.scheduler, config, generator))  # drawn on the CPU: the same batch on any device
        return collate(parts, generator)

    def collate(parts: list[dict], generator) -> dict:
        stored = all(part["conditional"] is not None for part in parts)  # teacher states only: their outputs came with them
        names = ("sample", "timesteps", "guidance_scale") + (("unconditional", "conditional") if stored else ())
        batch = {name: torch.cat([part[name] for part in parts]).to(accelerator.device) for name in names}
        prompts = [prompt for part in parts for prompt in part["prompts"]]
        batch["conditioning"] = encode_prompts(pipe, prompts, accelerator.device, resolution)
        if negatives is not None:  # those the teacher's runs recorded, else drawn now (data rows: the teacher runs per batch)
            drawn = [text for part in parts for text in (part["negatives"] or negatives.draw(part["prompts"], generator))]
            batch["negative"] = encode_negatives(pipe, drawn, negative, accelerator.device, resolution)
            batch["negative_rows"] = torch.tensor([bool(text) for text in drawn], device=accelerator.device)
            batch["recorded_negatives"] = stored and all(part["negatives"] is not None for part in parts)
        return batch

    gap_table = None
    if config.loss_weighting == "timestep":  # batches no training step draws (negative indices), a generator of their own
        generator = torch.Generator().manual_seed(config.seed + 17)
        batches = [make_batch(-1 - i, generator) for i in range(GAP_TABLE_BATCHES)]
        num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        # trajectory states sit at the schedule's few timesteps: one band each, or the first two of 25 steps (t = 999
        # and 959, whose gaps differ 3.7x) would share a band and the second would be weighted as a third of the first
        buckets = num_train_timesteps if config.source == "trajectories" else TIMESTEP_BUCKETS
        over_ranks = lambda t: accelerator.reduce(t.to(accelerator.device, torch.float32), "sum").cpu().double()  # noqa: E731
        gap_table = timestep_gap_table(pipe.unet, batches, negative, num_train_timesteps, buckets, per_unit_guidance=isinstance(guide, OutputGuide),
                                       reduce=over_ranks)  # the same weights on every rank, those of all the rows

    def compute_loss(model, batch):
        return distillation_loss(pipe.unet, model, batch, negative, config.loss_weighting, gap_table)

    held_out = None
    if config.validation_trajectories is not None:
        held_out = validation_pool(pipe, pools[0].prompts, config, accelerator, config.validation_trajectories, config.trajectory_first_steps,
                                   negatives)
        if config.step_heads is not None:
            held_out = held_out.at_timesteps(guide.config.step_heads)

    def validate(model) -> float:
        """The loss over every held-out state, with the same negatives drawn at each checkpoint."""
        total = 0.0
        for start in range(0, len(held_out), config.batch_size):
            generator = torch.Generator().manual_seed(config.seed + start)
            rows = held_out.rows(torch.arange(start, min(start + config.batch_size, len(held_out))))
            batch = collate([_noisy_batch(rows, pipe.scheduler, config, generator)], generator)
            total += compute_loss(model, batch).item() * len(rows.latents)
        return total / len(held_out)

    guide, ema = run_training(config, guide, make_batch, compute_loss, accelerator, description=f"distill-{config.design}",
                              validate=validate if held_out is not None else None)
    guide = copy_ema_into(guide, ema).eval()
    # a negative head records the steps it learnt apart: the rest of the guide was trained on its own steps
    first_steps = {"negative_first_steps": config.trajectory_first_steps} if config.negative_head else {"trained_first_steps": config.trajectory_first_steps}
    first_steps = first_steps if isinstance(guide, OutputGuide) and config.step_heads is None else {}  # step heads: the guide's steps stay its own
    guide.register_to_config(trained_guidance_range=(config.w_min, config.w_max), **first_steps,
                             trained_text_encoder=text_encoder_signature(pipe.text_encoder, getattr(pipe, "text_encoder_2", None)))
    if config.trajectory_first_steps and guide.correction_carry is None and isinstance(guide, OutputGuide):
        guide.correction_carry = fit_carry(pipe, pools[0].prompts, config)
    if accelerator.is_main_process:  # ranks hold the same weights; concurrent writes could interleave
        folder = Path(config.output_dir) / "guide"
        guide.save_pretrained(folder, safe_serialization=True)
        write_model_card(folder, guide, config, "distill")
    return guide


def fit_carry(pipe, prompts: list[str], config: GuidanceDistillConfig) -> CorrectionCarry:
    """The base's correction carry on the teacher's own grid (DDIM, trajectory_steps), fitted on the first prompts: a guide
    trained on the first steps carries its correction on with it after them (the factors are the base's own)."""
    from diffusers import DDIMScheduler

    from .loading import plug_and_play_from

    sampler = plug_and_play_from(pipe)
    sampler.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return CorrectionCarry.fit(sampler, list(prompts[:CARRY_FIT_PROMPTS]), full_steps=config.trajectory_first_steps,
                               num_inference_steps=config.trajectory_steps, height=training_resolution(pipe, config),
                               width=training_resolution(pipe, config))
