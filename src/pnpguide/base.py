"""The embedded default base model: train its VAE and UNet, save it as an SD folder, find it on disk."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline
from tqdm.auto import tqdm

from . import components, data
from .config_checks import check_at_least, check_base_configs, check_fraction, read_json_object
from .run_folder import training_run
from .training import TrainingConfig, copy_ema_into, run_training

ASSETS_DIR = Path(__file__).parent / "assets"
MODEL_FILES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what pnpguide's training losses implement

logger = logging.getLogger(__name__)


def default_base_dir() -> Path:
    return ASSETS_DIR / "base"


def check_model_dir(path: str | Path) -> Path:
    """Fail early, naming what is missing or malformed (the UNet's and scheduler's config fields included),
    instead of deep inside diffusers' loader."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} has no model_index.json: is it a diffusers pipeline folder?")
    index = read_json_object(path / "model_index.json")
    for name, spec in index.items():
        if isinstance(spec, list) and spec and spec[0] is not None and not (path / name).is_dir():
            raise FileNotFoundError(f"{path} lists component {name!r} in model_index.json but has no {name}/ folder")
    check_base_configs(path)
    return path


def load_pipeline(
    path: str | Path | None = None, lora: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion folder (the embedded default when `path` is None) offline, plus LoRA weights."""
    path = check_model_dir(path or default_base_dir())
    try:
        # use_safetensors: never fall back to unpickling a .bin file, which can run arbitrary code
        dtype_kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}  # fp32 is the default; the kwarg is being renamed
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **dtype_kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise RuntimeError(f"could not load the pipeline in {path}: {error}") from error
    if lora is not None:
        if not Path(lora).is_dir():
            raise FileNotFoundError(f"LoRA folder {str(lora)!r} does not exist")
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assemble_pipeline(unet, vae, tokenizer, text_encoder, scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe: StableDiffusionPipeline, path: str | Path, half: bool = True) -> Path:
    """Save as safetensors; fp16 storage halves the size and is cast back to fp32 on load."""
    if half:
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(str(path), safe_serialization=True)
    pipe.to(torch.float32)
    if half:  # transformers loads in the config's dtype by default: fp16 text embeddings would meet an fp32 UNet
        config_file = Path(path) / "text_encoder" / "config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"dtype": "float32"}, indent=2))
    return Path(path)


def warn_if_truncated(tokenizer, prompts: list[str]) -> int:
    """Say once how many prompts the tokenizer will cut to its limit; return that number.

    transformers' own notice ("... will result in indexing errors") is silenced: the pipeline truncates,
    so no indexing error can happen, and it names neither the prompts nor how many.
    """
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True  # as if shown
    limit = tokenizer.model_max_length
    cut = sum(len(ids) > limit for ids in tokenizer(list(prompts), truncation=False)["input_ids"])
    if cut:
        logger.warning(f"{cut} of {len(prompts)} prompts are longer than the tokenizer's limit of {limit} tokens and were cut to it")
    return cut


@torch.no_grad()
def encode_captions(pipe: StableDiffusionPipeline, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N, max_length, dim) prompt embeddings, computed exactly as the pipeline does at inference."""
    warn_if_truncated(pipe.tokenizer, captions)
    chunks = []
    for start in range(0, len(captions), batch_size):
        embeds, _ = pipe.encode_prompt(captions[start : start + batch_size], "cpu", 1, False)
        chunks.append(embeds.float())
    return torch.cat(chunks)


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
    styles = torch.randint(len(data.STYLES), (len(indices),), generator=generator).tolist()
    images = [data.render(data.sample_scene(i, seed), data.STYLES[s], noise_seed=i) for i, s in zip(indices, styles)]
    return torch.stack([data.image_to_tensor(im) for im in images])


@training_run
def train_vae(config: VAETrainConfig) -> AutoencoderKL:
    """Train the 64x64 <-> 16x16x4 VAE on every style and set SD's `scaling_factor` from the data."""
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
def encode_images(vae: AutoencoderKL, dataset: data.ShapesDataset, batch_size: int = 256) -> torch.Tensor:
    """(N, 4, 16, 16) scaled latents (posterior means) of a whole dataset, cached once before training."""
    latents = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding images"):
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))])
        latents.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
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


def cache_dataset(pipe: StableDiffusionPipeline, num_images: int, style: str, seed: int) -> CaptionedLatents:
    dataset = data.ShapesDataset(num_images, style=style, seed=seed)
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
