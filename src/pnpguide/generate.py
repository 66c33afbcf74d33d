"""`pnpguide generate`: images from one prompt, written as PNG files; everything checkable is checked before loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config_checks import read_json_object
from .carry import CorrectionCarry
from .devices import resolve_device, resolve_dtype
from .first_step import FirstStepFit
from .pipeline import check_guide_carries, check_image_size
from .schedulers import check_scheduler_name, scheduler_from_name
from .schedules import parse_w_schedule


@dataclass
class GenerateRequest:
    """What to generate; `None` sizes and steps mean the model's defaults."""

    prompt: str
    out: str = "image.png"  # PNG file; with several images, numbered: image-0.png, image-1.png, ...
    negative_prompt: str | None = None  # cfg mode, and guide mode with a guide distilled on negatives (others ignore it, with a warning)
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    steps: int | None = None  # None: 25, or a step-distilled guide's own count
    guidance_scale: float = 7.5
    w_schedule: str | None = None  # "W1,W2,..." or "linear:W0:W1" (see schedules.parse_w_schedule)
    guidance_interval: tuple[float, float] | None = None
    mode: str = "guide"
    scheduler: str | None = None  # a name in schedulers.SCHEDULERS; None: the base's own
    seed: int = 0  # image i uses seed + i, so adding images never changes the earlier ones
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "float32"
    cfg_first_steps: int = 0  # guide mode: the first steps run CFG (two UNet passes), the rest the guide
    first_step_fit: bool = False  # guide mode: fit the first step's unconditional pass (FirstStepFit), then run that step as CFG in one pass
    correction_carry: str | None = None  # a saved CorrectionCarry (JSON): CFG (or an output guide) for its first steps, then one pass per step
    guide_carry: str | None = None  # the carry saved in the guide's folder: used when no correction_carry is given and it fits the schedule


def check_request(request: GenerateRequest, base: str | Path | None, guide: str | Path | None = None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to load in, after the checks that need no weights: guide, device, dtype, scheduler, size."""
    if request.mode == "guide" and guide is None and base is not None:
        raise ValueError("--mode guide with --base needs --guide: the shipped guides fit only the embedded model; "
                         "distill one with `pnpguide distill --base ...`, or sample with --mode cfg")
    if request.cfg_first_steps and request.mode != "guide":
        raise ValueError(f"--cfg-first-steps splits sampling between CFG and the guide: it needs --mode guide, not --mode {request.mode}")
    if request.steps is not None and request.cfg_first_steps > request.steps:
        raise ValueError(f"--cfg-first-steps {request.cfg_first_steps} is more than --steps {request.steps}")
    if request.first_step_fit and (request.mode != "guide" or request.cfg_first_steps or request.negative_prompt is not None):
        raise ValueError("--first-step-fit makes the first step CFG in one pass in --mode guide; it takes neither --cfg-first-steps "
                         "(that step would already be CFG) nor --negative-prompt (the fit stands in for the empty prompt)")
    if request.correction_carry is not None:
        if request.mode not in ("cfg", "guide"):
            raise ValueError(f"--correction-carry carries CFG's or an output guide's correction on after its first steps: it needs "
                             f"--mode cfg or guide, not --mode {request.mode}")
        CorrectionCarry.load(request.correction_carry)  # a bad file fails here, before the weights load
        if request.mode == "guide":
            from .loading import check_guide_dir, default_guide_dir

            guide_dir = check_guide_dir(guide if guide is not None else default_guide_dir("tiny"))
            check_guide_carries(read_json_object(guide_dir / "config.json").get("reads", "latent"))
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)
    if request.scheduler is not None:
        check_scheduler_name(request.scheduler)
    if request.height is not None or request.width is not None:
        from .loading import check_model_dir, default_base_dir

        folder = check_model_dir(base or default_base_dir())
        multiple = folder_size_multiple(folder)
        default = read_json_object(folder / "unet" / "config.json").get("sample_size", 64) * _vae_factor(folder)
        check_image_size(request.height or default, request.width or default, multiple)
    return device, dtype


def generate(pipe, request: GenerateRequest) -> list[Path]:
    """Sample `request.num_images` images with `pipe` (a PlugAndPlayPipeline or its SDXL twin) and write them."""
    if request.scheduler is not None:
        pipe.scheduler = scheduler_from_name(request.scheduler, pipe.scheduler.config)
    trained_steps = pipe.guide.config.trained_step_counts if pipe.guide is not None and request.mode == "guide" else None
    steps = request.steps if request.steps is not None else (trained_steps or [25])[0]
    w = 1.0 if request.mode == "none" else parse_w_schedule(request.w_schedule, steps) if request.w_schedule else request.guidance_scale
    generators = [torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)]
    first_step_fit = FirstStepFit.fit(pipe, request.height, request.width, steps) if request.first_step_fit else None  # 64 UNet passes
    images = pipe(
        request.prompt, height=request.height, width=request.width, negative_prompt=request.negative_prompt,
        num_images_per_prompt=request.num_images, guidance_scale=w, num_inference_steps=steps, generator=generators,
        mode=request.mode, guidance_interval=request.guidance_interval, cfg_first_steps=request.cfg_first_steps,
        first_step_fit=first_step_fit,
        correction_carry=correction_carry(pipe, request, steps),
    ).images
    paths = output_paths(request.out, len(images))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def correction_carry(pipe, request: GenerateRequest, steps: int) -> CorrectionCarry | None:
    """--correction-carry's file; else, in guide mode, the carry shipped in the guide's folder when it was fitted for
    this scheduler and step count (otherwise the pipeline warns that such a guide needs one)."""
    if request.correction_carry:
        return CorrectionCarry.load(request.correction_carry)
    return fitting_carry(pipe, request.guide_carry, steps) if request.mode == "guide" else None


def fitting_carry(pipe, path: str | Path | None, steps: int) -> CorrectionCarry | None:
    """The carry saved at `path` (a guide folder's, :func:`guide_carry`) if it was fitted for the scheduler this pipeline
    samples its guide with at `steps` steps; else None."""
    if path is None:
        return None
    shipped = CorrectionCarry.load(path)
    scheduler = pipe.sampling_scheduler(steps, "guide")
    scheduler.set_timesteps(steps)
    return shipped if shipped.fits(scheduler.timesteps.tolist()) else None


def guide_carry(guide: str | Path | None) -> str | None:
    """The carry file in a guide's folder (a guide name or path; None: the default tiny guide, which has none)."""
    from .carry import GUIDE_CARRY_FILE
    from .loading import check_guide_dir

    if guide is None:
        return None
    path = check_guide_dir(guide) / GUIDE_CARRY_FILE
    return str(path) if path.is_file() else None


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
