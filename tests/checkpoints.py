"""Random-weight Stable Diffusion folders with the real classes and layouts, narrow enough for CPU tests.

What a user's SD 1.x / 2.x or SDXL folder holds (model_index.json; CLIP text encoders; a `CLIPTokenizer` with
vocab.json and merges.txt; SD's 4-level VAE; PNDM or Euler schedulers; SDXL's second text encoder with a
projection and its size/crop conditioning), at a few channels wide. Built offline: the tokenizer's vocabulary
is written by hand (characters plus a few merges), so no download is needed.

Resolution: both VAEs downsample 8x and both UNets by 2^(down blocks - 1), so images must be multiples of
8 * 8 = 64 pixels (SD 1.x / 2.x, 4 levels) or 8 * 2 = 16 pixels (SDXL layout here, 2 levels).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_WIDTH = 32  # hidden size of every test text encoder
MERGES = ("r e", "re d</w>", "c a", "ca t</w>", "o n</w>")


def write_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """tokenizer/ as SD ships it (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ",.!?'-:;()":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    for merge in MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = special | {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(str(folder))


def clip_text_config(vocab_size: int, **overrides) -> CLIPTextConfig:
    return CLIPTextConfig(**dict(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=vocab_size, hidden_size=TEXT_WIDTH,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=TEXT_WIDTH,
    ) | overrides)


def sd_vae(sample_size: int) -> AutoencoderKL:
    """SD's VAE layout (4 levels, 8x downsampling, scaling_factor 0.18215), 8-16 channels wide."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=sample_size, scaling_factor=0.18215,
    )


def sd15_unet(sample_size: int = 8, v_prediction: bool = False) -> UNet2DConditionModel:
    """SD 1.5's UNet layout (SD 2.x's with `v_prediction`: linear projections), 16-32 channels wide."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 16, 32, 32), layers_per_block=2, cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2, norm_num_groups=8, use_linear_projection=v_prediction,
    )


def build_sd15_folder(path: Path, sample_size: int = 8, v_prediction: bool = False) -> Path:
    """A random SD 1.5-layout folder (SD 2.x-like with `v_prediction`); 64-px images by default."""
    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(path / "tokenizer")
    scheduler_kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=sd_vae(sample_size * 8),
        text_encoder=CLIPTextModel(clip_text_config(len(tokenizer))).eval(),
        tokenizer=tokenizer,
        unet=sd15_unet(sample_size, v_prediction),
        scheduler=PNDMScheduler(**scheduler_kwargs, skip_prk_steps=True, prediction_type="v_prediction" if v_prediction else "epsilon"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def sdxl_unet(sample_size: int = 8) -> UNet2DConditionModel:
    """SDXL's UNet layout (text_time added conditioning, linear projections, deeper transformers), narrow."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=2, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TEXT_WIDTH, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,  # 6 time ids x 8 + the pooled text embedding
    )


def build_sdxl_folder(path: Path, sample_size: int = 8) -> Path:
    """A random SDXL-layout folder: two CLIP text encoders (the second with a projection) and tokenizers."""
    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(path / "tokenizer")
    tokenizer_2 = write_clip_tokenizer(path / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=sd_vae(sample_size * 8),
        text_encoder=CLIPTextModel(clip_text_config(len(tokenizer))).eval(),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(len(tokenizer_2))).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=sdxl_unet(sample_size),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
