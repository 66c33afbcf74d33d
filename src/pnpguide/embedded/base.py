"""The embedded default base model: train its VAE and UNet on the shapes data, save it as an SD folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline
from tqdm.auto import tqdm

from . import components, shapes
from ..config_checks import check_at_least, check_fraction
from ..loading import PREDICTION_TYPES, assemble_pipeline, encode_captions, save_pipeline
from ..run_folder import training_run
from ..training import TrainingConfig, copy_ema_into, run_training


# ----------------------------------------------------------------------------------------------------------------
# VAE


@dataclass
class VAETrainConfig(TrainingConfig):
    output_dir: str = "runs/vae"
    max_steps: int = 800
    batch_size: int = 32
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6  # SD's VAE uses a tiny KL term: it only keeps the latents' scale in check
    foreground_weight: float = 10.0  # loss weight of object pixels: objects cover ~10% of an image

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 0, "kl_weight", "foreground_weight")


def _style_batch(indices: list[int], generator: torch.Generator, seed: int) -> torch.Tensor:
    styles = torch.randint(len(shapes.STYLES), (len(indices),), generator=generator).tolist()
    images = [shapes.render(shapes.sample_scene(i, seed), shapes.STYLES[s], noise_seed=i) for i, s in zip(indices, styles)]
    return torch.stack([shapes.image_to_tensor(im) for im in images])


@training_run
def train_vae(config: VAETrainConfig) -> AutoencoderKL:
    """Train the 64x64 <-> 16x16x4 VAE on every style and set SD's `scaling_factor` from the shapes."""
    vae = components.build_vae()

    def make_batch(step, generator):
        start = step * config.batch_size
        return {"pixel_values": _style_batch(list(range(start, start + config.batch_size)), generator, config.seed)}

    def compute_loss(model, batch):
        posterior = model.encode(batch["pixel_values"]).latent_dist
        # Decode the posterior mean: the freshly initialised log-variance (std ~ 1) would drown the latents in
        # noise for thousands of steps, and everything downstream (caching, sampling) uses the mean anyway.
        decoded = model.decode(posterior.mode()).sample
        pixels = batch["pixel_values"]
        weight = 1 + (config.foreground_weight - 1) * foreground_mask(pixels)
        error = (decoded - pixels).pow(2) + (decoded - pixels).abs()
        return (weight * error).mean() / weight.mean() + config.kl_weight * posterior.kl().mean()

    vae, ema = run_training(config, vae, make_batch, compute_loss, description="train-vae")
    vae = copy_ema_into(vae, ema).eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, config.seed))
    vae.save_pretrained(Path(config.output_dir) / "vae", safe_serialization=True)
    return vae


def foreground_mask(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1 where a pixel differs from its image's border colour, else 0.

    Without it the background dominates the loss and the VAE learns object colours last.
    """
    border = torch.cat([pixels[..., :2, :].flatten(2), pixels[..., -2:, :].flatten(2)], dim=2)  # (B, 3, 4W)
    background = border.median(dim=2).values[..., None, None]  # (B, 3, 1, 1)
    return ((pixels - background).abs().amax(dim=1, keepdim=True) > 0.25).float()


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, seed: int, samples: int = 512) -> float:
    """1 / std of the latents, as SD sets it (0.18215), so the diffusion sees unit-variance latents."""
    pixels = _style_batch(list(range(samples)), torch.Generator().manual_seed(seed), seed + 1)
    return float(1.0 / vae.encode(pixels).latent_dist.mean.std())


@torch.no_grad()
def encode_images(vae: AutoencoderKL, dataset: shapes.ShapesDataset, batch_size: int = 256) -> torch.Tensor:
    """(N, 4, 16, 16) scaled latents (posterior means) of a whole dataset, cached once before training."""
    latents = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding images"):
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))])
        latents.append(vae.encode(pixels.to(vae.device)).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(latents)


# ----------------------------------------------------------------------------------------------------------------
# Text-to-image UNet (the base and its fine-tunes share the loss)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}; use {' or '.join(PREDICTION_TYPES)}")


def diffusion_loss(unet, scheduler, latents, prompt_embeds, generator: torch.Generator) -> torch.Tensor:
    """The standard SD training loss at uniformly random timesteps."""
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, prompt_embeds).sample
    return F.mse_loss(prediction.float(), prediction_target(scheduler, latents, noise, timesteps).float())


@dataclass
class CaptionedLatents:
    """A cached dataset: latents, an index into unique captions, and those captions' embeddings."""

    latents: torch.Tensor  # (N, 4, 16, 16)
    caption_ids: torch.Tensor  # (N,) index into embeddings
    embeddings: torch.Tensor  # (num_unique_captions + 1, max_length, dim); the last row is the empty prompt

    def batch(self, batch_size: int, generator: torch.Generator, caption_dropout: float) -> dict:
        rows = torch.randint(len(self.latents), (batch_size,), generator=generator)
        caption_ids = self.caption_ids[rows].clone()
        dropped = torch.rand(batch_size, generator=generator) < caption_dropout
        caption_ids[dropped] = len(self.embeddings) - 1  # caption dropout teaches the unconditional model
        return {"latents": self.latents[rows], "prompt_embeds": self.embeddings[caption_ids]}


def cache_dataset(pipe: StableDiffusionPipeline, num_images: int, style: str, seed: int, concept: str | None = None) -> CaptionedLatents:
    dataset = shapes.ShapesDataset(num_images, style=style, seed=seed, concept=concept)
    captions = [dataset.scene(i).caption for i in range(num_images)]
    unique = sorted(set(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    embeddings = encode_captions(pipe, unique + [""])
    latents = encode_images(pipe.vae, dataset)
    return CaptionedLatents(latents, torch.tensor([lookup[c] for c in captions]), embeddings)


@dataclass
class BaseTrainConfig(TrainingConfig):
    output_dir: str = "runs/base"
    vae_dir: str = "runs/vae/vae"  # a VAE trained by `pnpguide train-vae`
    max_steps: int = 6000
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 200
    num_images: int = 40000  # training images, rendered and encoded once
    caption_dropout: float = 0.1  # fraction of empty prompts, so that CFG has an unconditional model
    prediction_type: str = "v_prediction"  # "epsilon" (SD 1.x) or "v_prediction" (SD 2.x)
    use_ema: bool = True
    checkpointing_steps: int = 1000

    def __post_init__(self):
        super().__post_init__()
        check_fraction(self, "caption_dropout")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")


@training_run
def train_base(config: BaseTrainConfig) -> StableDiffusionPipeline:
    """Train the text-to-image UNet on cached latents; save the whole pipeline to `output_dir/pipeline`."""
    tokenizer, text_encoder = components.build_text_encoder()
    vae = AutoencoderKL.from_pretrained(config.vae_dir).eval()
    scheduler = components.build_scheduler(config.prediction_type)
    pipe = assemble_pipeline(components.build_unet(), vae, tokenizer, text_encoder, scheduler)
    cached = cache_dataset(pipe, config.num_images, "flat", config.seed)

    def make_batch(step, generator):
        return cached.batch(config.batch_size, generator, config.caption_dropout) | {"generator": generator}

    def compute_loss(unet, batch):
        return diffusion_loss(unet, scheduler, batch["latents"], batch["prompt_embeds"], batch["generator"])

    unet, ema = run_training(config, pipe.unet, make_batch, compute_loss, description="train-base")
    pipe.unet = copy_ema_into(unet, ema).eval()
    save_pipeline(pipe, Path(config.output_dir) / "pipeline")
    return pipe
