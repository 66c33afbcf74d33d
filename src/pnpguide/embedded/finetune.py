"""Fine-tune a base on another style, as users fine-tune SD: the whole UNet, or a LoRA with peft.

These fine-tunes are what a guide trained on the base is later plugged into, unchanged.

With `concept`, a fine-tune teaches the base a shape it never drew (shapes.NEW_SHAPES), as DreamBooth teaches a new
subject (Ruiz et al. 2023): every image of its data shows the new shape, and with `prior_images` half of every batch
is *prior preservation*, the base's own samples of its ordinary training captions, so that what it knew is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from . import shapes
from ..loading import encode_captions, load_pipeline, save_pipeline
from .base import CaptionedLatents, cache_dataset, diffusion_loss
from ..config_checks import ConfigError, check_at_least, check_fraction
from ..run_folder import training_run
from ..training import TrainingConfig, copy_ema_into, run_training

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA scripts do


@dataclass
class FinetuneConfig(TrainingConfig):
    output_dir: str = "runs/finetune"
    base: str | None = None  # SD folder to start from (default: the embedded model)
    style: str = "outline"  # shapes style to adapt to
    method: str = "full"  # "full": train every UNet weight; "lora": train a low-rank adapter only
    lora_rank: int = 8
    max_steps: int = 800
    learning_rate: float = 2e-4
    lr_warmup_steps: int = 50
    num_images: int = 10000
    caption_dropout: float = 0.1  # keep the unconditional model in step with the new style
    checkpointing_steps: int = 400
    concept: str | None = None  # a shape the base never drew (bar), taught DreamBooth-style: every training image shows it (default: none, a style fine-tune)
    prior_images: int | None = None  # prior preservation: half of every batch from this many of the base's own samples of its training captions (default: none)
    prior_guidance_scale: float = 1.0  # w of those samples (25 DDIM steps); 1: the base's conditional model, the distribution the fine-tune should keep

    def __post_init__(self):
        super().__post_init__()
        shapes.check_style(self.style)
        if self.method not in ("full", "lora"):
            raise ValueError(f"method must be 'full' or 'lora', got {self.method!r}")
        check_fraction(self, "caption_dropout")
        if self.concept is not None:
            shapes.check_concept(self.concept)
        if self.prior_images is not None:
            check_at_least(self, 2, "prior_images")
        if not self.prior_guidance_scale >= 1:
            raise ConfigError(f"prior_guidance_scale must be >= 1, got {self.prior_guidance_scale}")


@training_run
def finetune(config: FinetuneConfig) -> Path:
    """Fine-tune; return a full pipeline folder (`full`) or a folder of LoRA weights (`lora`)."""
    pipe = load_pipeline(config.base)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    cached = cache_dataset(pipe, config.num_images, config.style, config.seed + 1, config.concept)
    prior = prior_samples(pipe, config) if config.prior_images else None
    if config.method == "lora":
        pipe.unet.requires_grad_(False)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
        pipe.unet.add_adapter(lora)

    def make_batch(step, generator):
        if prior is None:
            return cached.batch(config.batch_size, generator, config.caption_dropout) | {"generator": generator}
        half = config.batch_size // 2
        new, old = cached.batch(config.batch_size - half, generator, config.caption_dropout), prior.batch(half, generator, config.caption_dropout)
        return {key: torch.cat([new[key], old[key]]) for key in new} | {"generator": generator}

    def compute_loss(unet, batch):
        return diffusion_loss(unet, pipe.scheduler, batch["latents"], batch["prompt_embeds"], batch["generator"])

    unet, ema = run_training(config, pipe.unet, make_batch, compute_loss, description=f"finetune-{config.method}")
    unet = copy_ema_into(unet, ema).eval()
    if config.method == "lora":
        path = Path(config.output_dir) / "lora"
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=layers, safe_serialization=True)
        return path
    pipe.unet = unet
    return save_pipeline(pipe, Path(config.output_dir) / "pipeline")


PRIOR_FILE = "prior-samples.safetensors"  # in the output folder: made once, reused by --resume


@torch.no_grad()
def prior_samples(pipe: StableDiffusionPipeline, config: FinetuneConfig, batch_size: int = 64) -> CaptionedLatents:
    """`config.prior_images` latents the base samples (25 DDIM steps, w = `prior_guidance_scale`) for captions of its own
    training distribution, with those captions: DreamBooth's prior-preservation data. Saved in the output folder and
    read back from there when the run resumes."""
    from safetensors.torch import load_file, save_file

    path = Path(config.output_dir) / PRIOR_FILE
    captions = [shapes.sample_scene(i, config.seed + 2).caption for i in range(config.prior_images)]
    unique = sorted(set(captions))
    if path.is_file():
        latents = load_file(str(path))["latents"]
    else:
        chunks = []
        for start in tqdm(range(0, len(captions), batch_size), desc="prior-preservation samples"):
            batch = captions[start:start + batch_size]
            generators = [torch.Generator().manual_seed(config.seed * 1_000_003 + start + i) for i in range(len(batch))]
            chunks.append(pipe(batch, height=shapes.IMAGE_SIZE, width=shapes.IMAGE_SIZE, num_inference_steps=25,  # the data's size
                               guidance_scale=config.prior_guidance_scale, generator=generators, output_type="latent").images.float())
        latents = torch.cat(chunks)
        save_file({"latents": latents.contiguous()}, str(path), metadata={"captions": json.dumps(captions)})
    lookup = {c: i for i, c in enumerate(unique)}
    return CaptionedLatents(latents, torch.tensor([lookup[c] for c in captions]), encode_captions(pipe, unique + [""]))
