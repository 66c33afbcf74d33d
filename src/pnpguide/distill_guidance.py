"""Stage 1, guidance distillation: train only the guide so that one guided UNet pass matches CFG.

For random w ~ U[w_min, w_max], the loss is
    || unet(x_t, t, c, residuals=guide(x_t, t, c, w)) - cfg(x_t, t, c, w) ||^2
with the base UNet frozen (Hsiao et al. 2024, sec. 3.2). The noisy states x_t come from dataset
latents noised by the scheduler (`data`), from the teacher's own CFG sampling trajectories
(`trajectories`: prompts only, and the states the student will actually meet at inference), or half
of each batch from both (`mix`). With `loss_weighting="relative"` each sample's error is divided by its
own CFG gap ||cfg - cond||^2: the gap at the first, pure-noise step is tens of times larger than at the
others and would otherwise dominate the loss (docs/guides.md, "Where the error is").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from .embedded import shapes
from .embedded.base import cache_dataset
from .guide import GUIDE_INPUTS, GUIDE_SIZES, GuideModel, text_encoder_signature
from .loading import encode_captions, load_guide, load_pipeline
from .sources import read_prompt_file
from .teacher import cfg_and_conditional, cfg_noise_pred, guided_noise_pred
from .run_folder import training_run
from .training import TrainingConfig, copy_ema_into, make_accelerator, run_training, shard_rows

SOURCES = ("data", "trajectories", "mix")
RELATIVE_LOSS_FLOOR = 1e-3  # added to each gap, so a sample whose prompt barely changes the output cannot dominate
LOSS_WEIGHTINGS = ("none", "relative")


@dataclass
class GuidanceDistillConfig(TrainingConfig):
    output_dir: str = "runs/guide"
    base: str | None = None  # SD folder whose UNet the guide serves (default: the embedded model)
    size: str = "tiny"  # "tiny" (~1% of the UNet) or "full" (as wide as the UNet's encoder)
    reads: str = "latent"  # the guide's input: "latent" (its own encoder of x_t) or "unet_features" (the frozen UNet's encoder features)
    scale_by_guidance: bool = False  # multiply the guide's residuals by (w - 1), so w = 1 is exactly the unguided UNet
    width_divisor: int | None = None  # tiny guides only: how much narrower than the UNet (default: 8 for latent, 16 for unet_features)
    init_guide: str | None = None  # start from this trained guide (train it further) instead of a new one
    w_min: float = 2.0  # guidance scales are drawn uniformly from [w_min, w_max]
    w_max: float = 9.0  # upper end of that range (diffusers' convention, at most 14)
    source: str = "data"  # where x_t comes from: "data" (noised dataset latents), "trajectories" (teacher sampling) or "mix" (half each)
    loss_weighting: str = "none"  # "none" (plain MSE) or "relative" (each sample's error over its own CFG gap)
    prompts: str | None = None  # text/JSONL prompt file (default: the embedded shapes captions)
    num_samples: int = 20000  # data: images to encode; trajectories: not used
    trajectories: int = 512  # trajectories: teacher sampling runs whose states are recorded
    trajectory_steps: int = 25  # trajectories: DDIM steps per run (one state per step)
    max_steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 50
    checkpointing_steps: int = 250

    def __post_init__(self):
        super().__post_init__()
        if self.size not in GUIDE_SIZES:
            raise ValueError(f"size must be one of {GUIDE_SIZES}, got {self.size!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.reads not in GUIDE_INPUTS:
            raise ValueError(f"reads must be one of {GUIDE_INPUTS}, got {self.reads!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.source == "mix" and self.batch_size < 2:
            raise ValueError(f"source='mix' takes half of each batch from each pool: batch_size must be >= 2, got {self.batch_size}")
        if self.width_divisor is not None and self.width_divisor < 1:
            raise ValueError(f"width_divisor must be >= 1, got {self.width_divisor}")
        check_guidance_range(self.w_min, self.w_max)
        if self.source in ("data", "mix") and self.prompts is not None:
            raise ValueError(f"source={self.source!r} trains on the embedded shapes images and their captions; use source='trajectories' with --prompts")


def check_guidance_range(w_min: float, w_max: float) -> None:
    if not 1.0 <= w_min <= w_max <= 14.0:
        raise ValueError(f"need 1 <= w_min <= w_max <= 14, got w_min={w_min}, w_max={w_max}")


def sample_guidance_scales(count: int, w_min: float, w_max: float, generator: torch.Generator) -> torch.Tensor:
    """(count,) guidance scales w ~ U[w_min, w_max]: the guide learns every w of the range, not a few."""
    return w_min + (w_max - w_min) * torch.rand(count, generator=generator)


@dataclass
class NoisyStates:
    """Where the student is trained: latents, their timesteps (None: draw per batch), prompts and w."""

    latents: torch.Tensor  # (N, C, h, w): clean latents (data) or noisy states x_t (trajectories)
    prompt_ids: torch.Tensor  # (N,) rows of the prompt-embedding table
    timesteps: torch.Tensor | None = None  # (N,) for trajectory states
    guidance: torch.Tensor | None = None  # (N,) the w each trajectory was sampled with


def freeze(pipe) -> None:
    """The base stays frozen: eval mode and no gradients (the guide is the only trained part)."""
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)


def _training_prompts(config: GuidanceDistillConfig) -> list[str]:
    if config.prompts is not None:
        return read_prompt_file(config.prompts)
    dataset = shapes.ShapesDataset(config.num_samples, seed=config.seed + 7)
    return sorted({dataset.scene(i).caption for i in range(config.num_samples)})


@torch.no_grad()
def teacher_trajectories(pipe, embeddings, config: GuidanceDistillConfig) -> NoisyStates:
    """Run the CFG teacher from noise for random prompts and w, recording x_t at every step."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.trajectory_steps)
    generator = torch.Generator().manual_seed(config.seed + 11)  # on the CPU: the same states on any device
    device = pipe.unet.device
    embeddings = embeddings.to(device)
    negative = embeddings[-1:]
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    states, ids, times, scales = [], [], [], []
    for start in tqdm(range(0, config.trajectories, 64), desc="teacher trajectories"):
        n = min(64, config.trajectories - start)
        prompt_ids = torch.randint(len(embeddings) - 1, (n,), generator=generator)
        w = sample_guidance_scales(n, config.w_min, config.w_max, generator)
        x = torch.randn((n, *shape), generator=generator).to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            states.append(x.cpu()), ids.append(prompt_ids), times.append(t.expand(n)), scales.append(w)
            x_in = scheduler.scale_model_input(x, t)
            output = cfg_noise_pred(pipe.unet, x_in, t, embeddings[prompt_ids], negative.expand(n, -1, -1), w)
            x = scheduler.step(output, t, x).prev_sample
    return NoisyStates(torch.cat(states), torch.cat(ids), torch.cat(times), torch.cat(scales))


def _noisy_batch(states: NoisyStates, rows: torch.Tensor, scheduler, config: GuidanceDistillConfig, generator: torch.Generator) -> dict:
    if states.timesteps is None:  # data: noise clean latents at a uniformly random timestep
        latents = states.latents[rows]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
        sample = scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), timesteps)
        w = sample_guidance_scales(len(rows), config.w_min, config.w_max, generator)
    else:
        sample, timesteps, w = states.latents[rows], states.timesteps[rows], states.guidance[rows]
    return {"sample": sample, "timesteps": timesteps, "prompt_ids": states.prompt_ids[rows], "guidance_scale": w}


def distillation_loss(unet, guide, batch: dict, embeddings: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """MSE between the guided student's and the CFG teacher's output at the same (x_t, t, c, w); with
    `weighting="relative"`, each sample's squared error over its own gap ||cfg - cond||^2 (mean over samples)."""
    prompt_embeds = embeddings[batch["prompt_ids"]]
    negative = embeddings[-1:].expand_as(prompt_embeds)
    with torch.no_grad():
        target, conditional = cfg_and_conditional(unet, batch["sample"], batch["timesteps"], prompt_embeds, negative, batch["guidance_scale"])
    prediction = guided_noise_pred(unet, guide, batch["sample"], batch["timesteps"], prompt_embeds, batch["guidance_scale"])
    if weighting == "none":
        return F.mse_loss(prediction.float(), target.float())
    error = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    gap = (conditional.float() - target.float()).pow(2).flatten(1).mean(1)
    return (error / (gap + RELATIVE_LOSS_FLOOR)).mean()


def _initial_guide(unet, config: GuidanceDistillConfig) -> GuideModel:
    if config.init_guide is not None:
        guide = load_guide(config.init_guide)
        guide.check_compatible(unet)
        return guide.train().requires_grad_(True)
    torch.manual_seed(config.seed)  # the guide's initial weights depend on the seed alone, not on earlier RNG use
    return GuideModel.from_unet(unet, config.size, config.width_divisor, reads=config.reads, scale_by_guidance=config.scale_by_guidance)


def _state_pools(pipe, config: GuidanceDistillConfig) -> tuple[list[NoisyStates], torch.Tensor]:
    """The pools of training states for `config.source` and the prompt-embedding table their ids index."""
    if config.source == "trajectories":
        embeddings = encode_captions(pipe, _training_prompts(config) + [""])  # last row: the empty prompt
        return [teacher_trajectories(pipe, embeddings, config)], embeddings
    cached = cache_dataset(pipe, config.num_samples, "flat", config.seed + 7)  # its captions are _training_prompts'
    pools = [NoisyStates(cached.latents, cached.caption_ids)]
    if config.source == "mix":
        pools.append(teacher_trajectories(pipe, cached.embeddings, config))
    return pools, cached.embeddings


def _split(batch_size: int, parts: int) -> list[int]:
    """`batch_size` rows over `parts` pools, as evenly as possible."""
    return [batch_size // parts + (i < batch_size % parts) for i in range(parts)]


@training_run
def train_guide(config: GuidanceDistillConfig) -> GuideModel:
    """Distill CFG into a new guide for `config.base`; saves it to `output_dir/guide` and returns it.

    Runs as one process or data-parallel under `accelerate launch`: every rank builds the same states,
    and :func:`shard_rows` gives the ranks disjoint rows of them at each step.
    """
    accelerator = make_accelerator(config)
    pipe = load_pipeline(config.base)
    freeze(pipe)
    pipe.unet.to(accelerator.device)  # the loop runs only the UNet; text encoder and VAE run once, up front, on the CPU
    guide = _initial_guide(pipe.unet, config)
    pools, embeddings = _state_pools(pipe, config)
    embeddings = embeddings.to(accelerator.device)

    def make_batch(batch_index, generator):
        rank, world_size = accelerator.process_index, accelerator.num_processes
        parts = []
        for states, size in zip(pools, _split(config.batch_size, len(pools))):
            rows = shard_rows(len(states.latents), size, batch_index, config.seed, rank, world_size)
            parts.append(_noisy_batch(states, rows, pipe.scheduler, config, generator))  # drawn on the CPU: the same batch on any device
        return {name: torch.cat([part[name] for part in parts]).to(accelerator.device) for name in parts[0]}

    def compute_loss(model, batch):
        return distillation_loss(pipe.unet, model, batch, embeddings, config.loss_weighting)

    guide, ema = run_training(config, guide, make_batch, compute_loss, accelerator, description=f"distill-{config.size}")
    guide = copy_ema_into(guide, ema).eval()
    guide.register_to_config(trained_guidance_range=(config.w_min, config.w_max), trained_text_encoder=text_encoder_signature(pipe.text_encoder))
    if accelerator.is_main_process:  # ranks hold the same weights; concurrent writes could interleave
        guide.save_pretrained(Path(config.output_dir) / "guide", safe_serialization=True)
    return guide
