"""`pnpguide generate`: images from one prompt, written as PNG files; everything checkable is checked before loading.

It calls the pipeline exactly as a Python user would (`pipe(prompt, generator=..., mode=..., policy=...)`), so the
shell and Python sample the same images from the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .carry import CorrectionCarry
from .config_checks import read_json_object
from .devices import resolve_device, resolve_dtype
from .pipeline import check_image_size
from .policy import GuidancePolicy, check_interval
from .schedulers import check_scheduler_name, scheduler_from_name


@dataclass
class GenerateRequest:
    """What to generate; `None` sizes and steps mean the model's and the policy's defaults."""

    prompt: str
    out: str = "image.png"  # PNG file; with several images, numbered: image-0.png, image-1.png, ...
    negative_prompt: str | None = None
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    steps: int | None = None  # None: the guide's own (25 for the default guide), else 50
    guidance_scale: float = 7.5
    mode: str = "guide"
    scheduler: str | None = None  # a name in schedulers.SCHEDULERS; None: the base's own
    seed: int = 0  # image i uses seed + i, so adding images never changes the earlier ones
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "float32"
    correction_carry: str | None = None  # a saved CorrectionCarry (JSON): CFG or the guide for its first steps, then carried
    guidance_interval: tuple[float, float] | None = None  # guidance only at t_low <= t <= t_high
    adaptive_threshold: float | None = None  # mode cfg: Adaptive Guidance's cosine threshold

    def policy(self) -> GuidancePolicy | None:
        """The policy the flags give, or None (the guide's own, or plain CFG) when none of its flags is set."""
        if self.correction_carry is None and self.guidance_interval is None and self.adaptive_threshold is None:
            return None
        carry = CorrectionCarry.load(self.correction_carry) if self.correction_carry else None
        return GuidancePolicy(carry=carry, interval=self.guidance_interval, adaptive_threshold=self.adaptive_threshold)


def check_request(request: GenerateRequest, base: str | Path | None, guide: str | Path | None = None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to load in, after the checks that need no weights: guide, policy, device, dtype, scheduler, size."""
    if request.mode == "guide" and guide is None and base is not None:
        raise ValueError("--mode guide with --base needs --guide: the shipped guides fit only the embedded model; "
                         "distill one with `pnpguide distill --base ...`, or sample with --mode cfg")
    if request.guidance_interval is not None:
        check_interval(request.guidance_interval)
    if request.adaptive_threshold is not None and request.mode != "cfg":
        raise ValueError(f"--adaptive-threshold compares CFG's two passes: it needs --mode cfg, not --mode {request.mode}")
    if request.correction_carry is not None and request.mode == "none":
        raise ValueError("--correction-carry carries CFG's or the guide's correction on: it needs --mode cfg or guide, not --mode none")
    request.policy()  # a bad carry file or threshold fails here, before the weights load
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)
    if request.scheduler is not None:
        check_scheduler_name(request.scheduler)
    if request.height is not None or request.width is not None:
        from .loading import check_model_dir, default_base_dir

        folder = check_model_dir(base or default_base_dir())
        default = read_json_object(folder / "unet" / "config.json").get("sample_size", 64) * _vae_factor(folder)
        check_image_size(request.height or default, request.width or default, folder_size_multiple(folder))
    return device, dtype


def generate(pipe, request: GenerateRequest) -> list[Path]:
    """Sample `request.num_images` images with `pipe` (a PlugAndPlayPipeline or its SDXL twin) and write them."""
    if request.scheduler is not None:
        pipe.scheduler = scheduler_from_name(request.scheduler, pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)]
    images = pipe(
        request.prompt, height=request.height, width=request.width, negative_prompt=request.negative_prompt,
        num_images_per_prompt=request.num_images, guidance_scale=1.0 if request.mode == "none" else request.guidance_scale,
        num_inference_steps=request.steps, generator=generators, mode=request.mode, policy=request.policy(),
    ).images
    paths = output_paths(request.out, len(images))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def output_paths(out: str | Path, count: int) -> list[Path]:
    """`out` itself for one image; `stem-0.png`, `stem-1.png`, ... beside it for several."""
    out = Path(out)
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def folder_size_multiple(folder: Path) -> int:
    """pipeline.size_multiple, from a model folder's config files (no weights loaded)."""
    unet_blocks = len(read_json_object(folder / "unet" / "config.json").get("block_out_channels", (0,) * 4))
    return _vae_factor(folder) * 2 ** (unet_blocks - 1)


def _vae_factor(folder: Path) -> int:
    return 2 ** (len(read_json_object(folder / "vae" / "config.json").get("block_out_channels", (0,) * 4)) - 1)
