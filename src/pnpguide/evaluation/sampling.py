"""Generating evaluation images: one seed per image, so batching never changes a picture."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusers import StableDiffusionXLPipeline

from ..pipeline import PlugAndPlayPipeline
from ..pipeline_xl import PlugAndPlayXLPipeline


def as_plug_and_play(pipe) -> PlugAndPlayPipeline | PlugAndPlayXLPipeline:
    """The same components as a PlugAndPlayPipeline (PlugAndPlayXLPipeline for SDXL), keeping `pipe`'s progress-bar setting.

    diffusers' `from_pipe` starts with a fresh progress-bar config, which printed a 25-step bar for
    every batch under the evaluation's own bar.
    """
    if isinstance(pipe, (PlugAndPlayPipeline, PlugAndPlayXLPipeline)):
        return pipe
    plug_and_play = (PlugAndPlayXLPipeline if isinstance(pipe, StableDiffusionXLPipeline) else PlugAndPlayPipeline).from_pipe(pipe)
    plug_and_play.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return plug_and_play


def generate_images(
    pipe,
    prompts: list[str],
    guidance_scale: float,
    num_inference_steps: int = 25,
    seed: int = 0,
    mode: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    negative_prompts: list[str] | None = None,
) -> list[Image.Image]:
    """Image i uses the generator seeded with `seed + i`, whatever the batch size or mode, and the negative prompt
    `negative_prompts[i]` if given (one per prompt); each guide samples with its own policy."""
    pipe = as_plug_and_play(pipe)
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"sampling w={guidance_scale}", disable=not progress):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        negative = negative_prompts[start : start + batch_size] if negative_prompts is not None else None
        images += pipe(batch, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=generators, mode=mode,
                       negative_prompt=negative).images
    return images


def image_grid(rows: list[list[Image.Image]], scale: int = 2) -> Image.Image:
    """Paste rows of equally sized images into one picture, enlarged `scale` times without smoothing."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit images (inf when identical)."""
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def mean_psnr(images: list[Image.Image], references: list[Image.Image]) -> float:
    """Mean PSNR, each image's capped at 60 dB so that one identical pair cannot dominate."""
    return float(np.mean([min(psnr(a, b), 60.0) for a, b in zip(images, references)]))
