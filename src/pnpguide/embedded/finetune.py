"""Fine-tune a base on another style, as users fine-tune SD: the whole UNet, or a LoRA with peft.

These fine-tunes are what a guide trained on the base is later plugged into, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from . import shapes
from ..loading import load_pipeline, save_pipeline
from .base import cache_dataset, diffusion_loss
from ..config_checks import check_fraction
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

    def __post_init__(self):
        super().__post_init__()
        shapes.check_style(self.style)
        if self.method not in ("full", "lora"):
            raise ValueError(f"method must be 'full' or 'lora', got {self.method!r}")
        check_fraction(self, "caption_dropout")


@training_run
def finetune(config: FinetuneConfig) -> Path:
    """Fine-tune; return a full pipeline folder (`full`) or a folder of LoRA weights (`lora`)."""
    pipe = load_pipeline(config.base)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    cached = cache_dataset(pipe, config.num_images, config.style, config.seed + 1)
    if config.method == "lora":
        pipe.unet.requires_grad_(False)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
        pipe.unet.add_adapter(lora)

    def make_batch(step, generator):
        return cached.batch(config.batch_size, generator, config.caption_dropout) | {"generator": generator}

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
