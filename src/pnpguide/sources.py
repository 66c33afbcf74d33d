"""Where the training states x_t come from, for both distillation stages: one interface, four sources.

- `trajectories`: the CFG teacher samples from noise for the user's prompts (no images needed). Stage 1
  trains on every recorded state x_t (the states the student meets at inference); stage 2 on the final
  latents, noised onto the student's timesteps (see :func:`teacher_trajectories`).
- `images`: a folder of images with a `metadata.jsonl` (`{"file_name": ..., "text": ...}` per line, the
  diffusers / datasets imagefolder layout), resized and centre-cropped to the resolution, VAE-encoded.
- `shapes`: the embedded default model's own procedural training images (only for that model).
- `mix` (stage 1): half of each batch from the data (images, or shapes on the embedded model), half from
  teacher trajectories over the data's captions.

Every source is a pool of :class:`~pnpguide.shards.Rows`; prompts are encoded per batch (`encode_prompts`).
Trajectories and image latents are written to safetensors shards under the run's output folder, split over
ranks, resumed shard by shard and streamed a batch at a time (:mod:`pnpguide.shards`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
from PIL import Image

from .config_checks import read_json_object
from .shards import TensorPool
from .training import TrainingConfig

SOURCES = ("shapes", "trajectories", "images", "mix")
METADATA = "metadata.jsonl"
TRAJECTORIES_PER_SHARD = 64  # also the teacher's sampling batch
IMAGES_PER_SHARD = 64
SEED_MASK = 0x7FFF_FFFF_FFFF
VALIDATION_SEED = 1_000_003  # validation runs draw from seed + this: no shard of theirs repeats a training run's draws


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file (objects with a 'prompt', 'text' or 'caption')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({error.reason} at byte {error.start}); re-save it as UTF-8") from error
    lines = [line for line in lines if line]
    if path.suffix == ".jsonl":
        lines = [_prompt_from_json(line, path, number) for number, line in enumerate(lines, 1)]
    if not lines:
        raise ValueError(f"prompt file {path} has no prompts; write one prompt per line")
    return lines


def _prompt_from_json(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
        return next(str(record[k]) for k in ("prompt", "text", "caption") if k in record)
    except (json.JSONDecodeError, TypeError, StopIteration) as error:
        raise ValueError(f"{path}:{number}: expected a JSON object with a 'prompt', 'text' or 'caption' field") from error


# ----------------------------------------------------------------------------------------------------------------
# settings and their checks (before any model loads)


@dataclass
class SourceConfig(TrainingConfig):
    """The data settings both distillation stages share."""

    SOURCES: ClassVar[tuple[str, ...]] = SOURCES  # the sources this stage can train on
    EMBEDDED_SOURCE: ClassVar[str] = "shapes"  # the default on the embedded base, with neither --prompts nor --images

    source: str | None = None  # "trajectories" (the CFG teacher's sampling from --prompts), "images" (an --images folder), "shapes" (the embedded model's own data) or "mix" (stage 1: half data, half trajectories over its captions) (default: images with --images, else trajectories; stage 2 on the embedded base: shapes)
    prompts: str | None = None  # text or JSONL prompt file for source "trajectories" (default on the embedded base: its shapes captions)
    images: str | None = None  # folder of images plus metadata.jsonl ({"file_name": ..., "text": ...} per line), for source "images" or "mix"
    resolution: int | None = None  # image side in pixels for trajectories and images (default: the UNet's sample_size times the VAE's factor)
    num_samples: int = 20000  # shapes: images rendered and encoded
    trajectories: int = 512  # trajectories: teacher sampling runs from random prompts and w, written to output_dir/trajectories
    trajectory_steps: int = 25  # trajectories: DDIM steps per run

    def __post_init__(self):
        super().__post_init__()
        self.source = resolve_source(self)


def is_embedded(base: str | Path | None) -> bool:
    from .loading import default_base_dir

    return base is None or Path(base).resolve() == default_base_dir().resolve()


def resolve_source(config: SourceConfig) -> str:
    """The source a config names, or its default; a combination that cannot work is a one-line ValueError."""
    embedded = is_embedded(getattr(config, "base", None))
    source = config.source or ("images" if config.images else "trajectories" if config.prompts or not embedded else config.EMBEDDED_SOURCE)
    if source not in config.SOURCES:
        raise ValueError(f"source must be one of {config.SOURCES}, got {source!r}")
    if source == "shapes" and not embedded:
        raise ValueError("source 'shapes' is the embedded model's own training data; with --base pass --prompts FILE or --images DIR")
    if config.images is not None and source not in ("images", "mix"):
        raise ValueError(f"--images is read by source 'images' or 'mix', not {source!r}")
    if config.prompts is not None and source != "trajectories":
        raise ValueError(f"--prompts is read by source 'trajectories' only; source {source!r} takes the captions of its data")
    if source == "trajectories" and config.prompts is None and not embedded:
        raise ValueError("a --base needs training prompts or images: pass --prompts FILE (teacher trajectories) or --images DIR (images + metadata.jsonl)")
    if config.images is None and (source == "images" or (source == "mix" and not embedded)):
        raise ValueError(f"source {source!r} needs --images DIR (image files plus a metadata.jsonl of file_name and text)")
    if config.resolution is not None:
        if config.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {config.resolution}")
        if source == "shapes" or (source == "mix" and config.images is None):
            raise ValueError("the shapes data is drawn at the embedded model's own resolution; leave out --resolution")
    return source


def check_resolution(base: str | Path | None, resolution: int) -> int:
    """`resolution` must be divisible by the VAE's factor times the UNet's (2 ^ (down blocks - 1)), read from
    the base folder's configs, or the UNet's skip connections would not line up."""
    from .loading import default_base_dir

    folder = Path(base) if base is not None else default_base_dir()
    vae = read_json_object(folder / "vae" / "config.json")
    unet = read_json_object(folder / "unet" / "config.json")
    vae_factor = 2 ** (len(vae.get("block_out_channels", [64])) - 1)
    multiple = vae_factor * 2 ** (len(unet["block_out_channels"]) - 1)
    if resolution % multiple:
        suggestion = max(multiple, round(resolution / multiple) * multiple)
        raise ValueError(f"resolution {resolution} is not a multiple of {multiple} (VAE factor {vae_factor} x the UNet's "
                         f"{multiple // vae_factor}) for {folder}; use e.g. {suggestion}")
    return resolution


def read_image_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """(image file, caption) pairs from `folder/metadata.jsonl`, every named file checked to exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    metadata = folder / METADATA
    if not metadata.is_file():
        raise FileNotFoundError(f'{folder} has no {METADATA}; write one line per image: {{"file_name": "0001.png", "text": "its caption"}}')
    pairs = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            pairs.append(_image_record(line, folder, f"{metadata}:{number}"))
    if not pairs:
        raise ValueError(f"{metadata} lists no images")
    return pairs


def _image_record(line: str, folder: Path, where: str) -> tuple[Path, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f'{where}: not JSON; expected {{"file_name": "0001.png", "text": "its caption"}}') from None
    if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or not isinstance(record.get("text"), str):
        raise ValueError(f"{where}: expected a JSON object with string 'file_name' and 'text' fields")
    path = folder / record["file_name"]
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {record['file_name']!r} does not exist in {folder}")
    return path, record["text"]


# ----------------------------------------------------------------------------------------------------------------
# building the pools


def training_resolution(pipe, config: SourceConfig) -> int:
    return config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor


class BaseData(Protocol):
    """A base model's own captioned images, for a run given neither --prompts nor --images: the embedded model's world
    supplies one (`pnpguide.embedded.source.ShapesData`), which the CLI hands to the stages on the embedded base."""

    def captions(self, count: int, seed: int) -> list[str]:
        """Captions of `count` images drawn with `seed`, repeats kept (each kind of image keeps its share of the teacher's
        runs, which draw from the list uniformly): the prompts of teacher trajectories."""

    def pool(self, pipe, count: int, seed: int) -> TensorPool:
        """`count` images encoded by the pipeline's VAE, with their captions."""


def training_pools(pipe, config: SourceConfig, accelerator, record: str, data_seed: int, first_steps: int | None = None,
                   negatives=None, base_data: BaseData | None = None) -> list:
    """The pools `config.source` trains on: one, or for `mix` the data and trajectories over its captions.

    record: "states" (stage 1: every x_t of each trajectory, or its `first_steps` first ones) or "samples" (stage 2:
    the final latents). `negatives` (a NegativeSampler): teacher runs draw a negative prompt each (see
    :func:`teacher_trajectories`). `base_data`: the base's own images and captions, used when the config names neither
    prompts nor images (source "shapes", or trajectories over its captions)."""
    output = Path(config.output_dir)
    if config.prompts is None and config.images is None and base_data is None:
        raise ValueError(f"source {config.source!r} without --prompts or --images reads the base's own data: on the embedded base, "
                         "pass base_data=pnpguide.embedded.source.ShapesData() (the CLI does)")
    if config.source == "trajectories":
        prompts = read_prompt_file(config.prompts) if config.prompts else base_data.captions(config.num_samples, config.seed + 7)
        return [teacher_trajectories(pipe, prompts, output / "trajectories", config, accelerator, record, first_steps, negatives)]
    if config.images is not None:
        data = image_pool(pipe, read_image_folder(config.images), output / "image-latents", training_resolution(pipe, config), accelerator)
    else:
        data = base_data.pool(pipe, config.num_samples, data_seed)
    if config.source != "mix":
        return [data]
    return [data, teacher_trajectories(pipe, data.prompts, output / "trajectories", config, accelerator, record, negatives=negatives)]


def validation_pool(pipe, prompts: list[str], config: SourceConfig, accelerator, runs: int, first_steps: int | None = None, negatives=None):
    """`runs` teacher runs held out of training (source "trajectories"): the training pool's `prompts` and w range,
    other noise and draws (seed + VALIDATION_SEED), in `output_dir/validation-trajectories`. A guide's loss on
    their states against its loss on the ones it trains at tells whether more trajectories would help."""
    held_out = dataclasses.replace(config, trajectories=runs, seed=config.seed + VALIDATION_SEED)
    folder = Path(config.output_dir) / "validation-trajectories"
    return teacher_trajectories(pipe, prompts, folder, held_out, accelerator, "states", first_steps, negatives)


def _digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()


@torch.no_grad()
def teacher_trajectories(pipe, prompts: list[str], folder: Path, config: SourceConfig, accelerator, record: str = "states",
                         first_steps: int | None = None, negatives=None):
    """Run the CFG teacher (DDIM, `config.trajectory_steps` steps) from noise for random prompts and
    w ~ U[w_min, w_max]; write shards of `TRAJECTORIES_PER_SHARD` runs to `folder`; return their pool.

    record="states" keeps every x_t with its t and w (stage 1 learns at the states sampling visits), and the
    teacher's unconditional and conditional outputs there, which the teacher computed anyway: training at a
    recorded state then needs no teacher call (an output guide, no UNet call at all). With `negatives` (a
    NegativeSampler), each run draws a negative prompt and samples CFG with it in the unconditional half: the states
    are those a guide meets with negative prompts, the recorded unconditional output is the negative's, and
    `negative_ids` (into `negatives.table(prompts)`) says which. With `first_steps`, each run
    stops after that many steps (a guide for the first steps, its correction carried on after them).
    record="samples" keeps only the final latents, which stage 2 uses as synthetic data and noises onto
    the student's timesteps: progressive distillation (Salimans & Ho 2022) trains on noised data at the
    student's grid, not on teacher states, which lie on the teacher's finer grid; and one latent per run is
    `trajectory_steps` times less to store.
    """
    from diffusers import DDIMScheduler

    from .conditioning import cfg_added_cond_kwargs, encode_negative, encode_negatives, encode_prompts
    from .loading import warn_if_truncated
    from .shards import ShardPool, write_shards
    from .teacher import cfg_combine, unconditional_and_conditional

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.trajectory_steps)
    resolution, device = training_resolution(pipe, config), pipe.unet.device
    latent_size = resolution // pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, latent_size, latent_size)
    negative = encode_negative(pipe, device, resolution)
    warn_if_truncated(pipe.tokenizer, prompts)
    fingerprint = {"record": record, "prompts": _digest(prompts), "trajectories": str(config.trajectories), "seed": str(config.seed),
                   "steps": str(config.trajectory_steps), "guidance": f"{config.w_min},{config.w_max}", "shape": str(shape)}
    timesteps = scheduler.timesteps
    table = negatives.table(prompts) if negatives is not None else None
    negative_id = {text: i for i, text in enumerate(table or ())}
    if table is not None:  # no key without negatives: shards written before negatives could be recorded stay valid
        fingerprint["negatives"] = f"{_digest(table)},{negatives.rate}"
    if record == "states":
        fingerprint["outputs"] = "unconditional,conditional"  # shards written before outputs were recorded are made again
        if first_steps is not None:
            timesteps, fingerprint["first_steps"] = timesteps[:first_steps], str(first_steps)

    def make_shard(number: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash((config.seed + 11, number)) & SEED_MASK)  # on the CPU: the same on any device
        n = min(TRAJECTORIES_PER_SHARD, config.trajectories - number * TRAJECTORIES_PER_SHARD)
        prompt_ids = torch.randint(len(prompts), (n,), generator=generator)
        w = config.w_min + (config.w_max - config.w_min) * torch.rand(n, generator=generator)
        x = torch.randn((n, *shape), generator=generator).to(device) * scheduler.init_noise_sigma
        run_prompts = [prompts[i] for i in prompt_ids.tolist()]
        conditioning = encode_prompts(pipe, run_prompts, device, resolution)
        run_negative, negative_ids = negative.expand(n), None
        if table is not None:  # drawn after the runs' prompts, w and noise: those are the same as without negatives
            drawn = negatives.draw(run_prompts, generator)
            run_negative = encode_negatives(pipe, drawn, negative, device, resolution)
            negative_ids = torch.tensor([negative_id[text] for text in drawn])
        added = cfg_added_cond_kwargs(conditioning, run_negative)
        states, unconditional, conditional = [], [], []
        for t in timesteps:
            model_input = scheduler.scale_model_input(x, t)
            noise_uncond, noise_cond = unconditional_and_conditional(pipe.unet, model_input, t, conditioning.prompt_embeds,
                                                                     run_negative.prompt_embeds, added)
            if record == "states":  # stage 2 keeps only the final latents: no copies of the steps
                for recorded, value in ((states, model_input), (unconditional, noise_uncond), (conditional, noise_cond)):
                    recorded.append(value.cpu())
            x = scheduler.step(cfg_combine(noise_uncond, noise_cond, w), t, x).prev_sample
        steps = 1 if record == "samples" else len(timesteps)  # rows are step-major: (steps * n, C, h, w)
        recorded_negatives = {} if negative_ids is None else {"negative_ids": negative_ids.repeat(steps)}
        if record == "samples":
            return {"latents": x.cpu(), "prompt_ids": prompt_ids, "guidance": w, **recorded_negatives}
        return {"latents": torch.cat(states), "prompt_ids": prompt_ids.repeat(steps), "timesteps": timesteps.repeat_interleave(n),
                "guidance": w.repeat(steps), "unconditional": torch.cat(unconditional), "conditional": torch.cat(conditional), **recorded_negatives}

    count = -(-config.trajectories // TRAJECTORIES_PER_SHARD)
    return ShardPool(write_shards(folder, count, make_shard, fingerprint, accelerator), prompts, table)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) in [-1, 1]: the shorter side resized to `resolution`, then centre-cropped."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1  # (H, W, 3) -> (3, H, W)


@torch.no_grad()
def image_pool(pipe, pairs: list[tuple[Path, str]], folder: Path, resolution: int, accelerator):
    """The images' latents (posterior mean x the VAE's scaling factor, as diffusers' training scripts scale them),
    written to shards of `IMAGES_PER_SHARD`; the mean, not a sample, so a resumed run reuses the same latents."""
    from .shards import ShardPool, write_shards

    from .loading import warn_if_truncated

    vae = pipe.vae
    warn_if_truncated(pipe.tokenizer, [caption for _, caption in pairs])
    fingerprint = {"record": "images", "files": _digest([f"{p}\t{c}" for p, c in pairs]), "resolution": str(resolution)}

    def make_shard(number: int) -> dict[str, torch.Tensor]:
        start = number * IMAGES_PER_SHARD
        chunk = pairs[start : start + IMAGES_PER_SHARD]
        pixels = torch.stack([load_image(path, resolution) for path, _ in chunk]).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return {"latents": ((latents - shift) * vae.config.scaling_factor).float().cpu(), "prompt_ids": torch.arange(start, start + len(chunk))}

    count = -(-len(pairs) // IMAGES_PER_SHARD)
    return ShardPool(write_shards(folder, count, make_shard, fingerprint, accelerator), [caption for _, caption in pairs])
