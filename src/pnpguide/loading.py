"""Finding, checking and loading models: Stable Diffusion folders (the embedded default when none is named), the
shipped guides, user guides, and a base + guide (+ LoRA) pipeline; encoding prompts as the pipeline does."""

from __future__ import annotations

from pathlib import Path

import inspect
import json
import logging

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import SafetensorError, safe_open

from .config_checks import check_base_configs, check_guide_config, read_json_object
from .guides import GuideModel, unet_mismatch
from .guides.base import DEFAULT_GUIDE, SHIPPED_GUIDES_DIR, design_class, shipped_guides
from .pipeline import PlugAndPlayPipeline
from .quiet import quiet_component_types, quiet_text_encoder_lora
from .pipeline_xl import PlugAndPlayXLPipeline

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).parent / "assets"  # the embedded default base, its shipped guides and fine-tunes
MODEL_FILES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what pnpguide's training losses implement
GUIDE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SD_PIPELINES = ("StableDiffusionPipeline", "PlugAndPlayPipeline")  # model_index.json `_class_name`s, SD 1.x / 2.x
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "PlugAndPlayXLPipeline")
SD_COMPONENTS = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
SDXL_COMPONENTS = SD_COMPONENTS | {"text_encoder_2", "tokenizer_2"}


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
    pipeline_class(path)  # a pipeline kind pnpguide cannot sample, or an SDXL UNet without SDXL's text encoders
    return path


def pipeline_class(path: str | Path) -> type[StableDiffusionPipeline] | type[StableDiffusionXLPipeline]:
    """The diffusers class that loads the folder: from model_index.json's `_class_name`, or, for a fine-tune that
    names a subclass or plain "DiffusionPipeline", from the components it lists (text_encoder_2: SDXL)."""
    path = Path(path)
    index = read_json_object(path / "model_index.json")
    name = index.get("_class_name")
    listed = {key for key, spec in index.items() if isinstance(spec, list) and spec and spec[0] is not None}
    if name in SD_PIPELINES:
        kind = StableDiffusionPipeline
    elif name in SDXL_PIPELINES:
        kind = StableDiffusionXLPipeline
    elif SDXL_COMPONENTS <= listed:
        kind = StableDiffusionXLPipeline
    elif SD_COMPONENTS <= listed:
        kind = StableDiffusionPipeline
    else:
        supported = ", ".join(SD_PIPELINES + SDXL_PIPELINES)
        raise ValueError(f"{path} holds a {name} with components {sorted(listed)}; pnpguide supports {supported} (or a subclass with their components)")
    _check_conditioning(path, kind, listed)
    return kind


def _check_conditioning(path: Path, kind: type, listed: set[str]) -> None:
    """SDXL's UNet adds an embedding of the pooled second-encoder prompt and the size/crop ids: without
    text_encoder_2 it fails deep in diffusers (a TypeError in get_aug_embed), and an SD UNet cannot take them."""
    missing = sorted(SDXL_COMPONENTS - listed) if kind is StableDiffusionXLPipeline else sorted(SD_COMPONENTS - listed)
    if missing:
        raise ValueError(f"{path} is a {kind.__name__} folder but model_index.json does not list {', '.join(missing)}")
    unet_config = path / "unet" / "config.json"
    added = read_json_object(unet_config).get("addition_embed_type") if unet_config.is_file() else None
    if kind is StableDiffusionXLPipeline and added != "text_time":
        raise ValueError(f"{path} is an SDXL folder but its UNet has addition_embed_type={added!r}, not 'text_time' (SDXL's size/crop conditioning)")
    if kind is StableDiffusionPipeline and added is not None and SDXL_COMPONENTS <= listed:
        raise ValueError(f"{path}/model_index.json names {read_json_object(path / 'model_index.json').get('_class_name')} but the folder is SDXL "
                         f"(text_encoder_2, a UNet with addition_embed_type={added!r}): set \"_class_name\" to \"StableDiffusionXLPipeline\"")
    if kind is StableDiffusionPipeline and added is not None:
        raise ValueError(f"{path}'s UNet has addition_embed_type={added!r}, which needs SDXL's second text encoder: add text_encoder_2 and tokenizer_2 (an SDXL folder)")


def load_pipeline(
    path: str | Path | None = None, lora: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load a Stable Diffusion 1.x / 2.x or SDXL folder (the embedded default when `path` is None) offline, as the
    class :func:`pipeline_class` picks, plus LoRA weights."""
    path = check_model_dir(path or default_base_dir())
    try:
        # use_safetensors: never fall back to unpickling a .bin file, which can run arbitrary code
        dtype_kwargs = {} if dtype == torch.float32 else {"dtype": dtype}  # fp32 is the default
        with quiet_component_types():
            pipe = pipeline_class(path).from_pretrained(str(path), local_files_only=True, use_safetensors=True, **dtype_kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise RuntimeError(f"could not load the pipeline in {path}: {error}") from error
    if lora is not None:
        load_lora(pipe, lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if torch.device(device) != torch.device("cpu") else pipe


def load_lora(pipe, lora: str | Path) -> None:
    """LoRA weights (a folder or a shipped LoRA's name) into a loaded pipeline, through diffusers' `load_lora_weights`."""
    with quiet_text_encoder_lora():
        pipe.load_lora_weights(str(lora_dir(lora)))


def shipped_lora_dirs() -> list[Path]:
    return sorted(p for p in (ASSETS_DIR / "finetunes").glob("*") if (p / "pytorch_lora_weights.safetensors").is_file())


def lora_dir(lora: str | Path) -> Path:
    """A LoRA folder, or the name of a LoRA shipped for the embedded model (bar-lora, outline-lora)."""
    if Path(lora).is_dir():
        return Path(lora)
    shipped = {p.name: p for p in shipped_lora_dirs()}
    if str(lora) in shipped:
        return shipped[str(lora)]
    raise FileNotFoundError(f"LoRA folder {str(lora)!r} does not exist (LoRAs shipped for the embedded model: {', '.join(shipped)})")


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
    chunks = (list(prompts[start : start + 1024]) for start in range(0, len(prompts), 1024))  # memory flat in the number of prompts
    cut = sum(len(ids) > limit for chunk in chunks for ids in tokenizer(chunk, truncation=False)["input_ids"])
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


def default_guide_dir(name: str = DEFAULT_GUIDE) -> Path:
    """A guide shipped for the embedded base model (default: the recommended one)."""
    return SHIPPED_GUIDES_DIR / name


def shipped_guide_dirs() -> list[Path]:
    """Every guide shipped for the embedded base."""
    return list(shipped_guides().values())


def load_guide(path: str | Path) -> GuideModel:
    """Load a guide folder (or a shipped guide by name: default, 8-step, 4-step, paper) after :func:`check_guide_dir`."""
    return GuideModel.from_pretrained(str(check_guide_dir(path)), use_safetensors=True)


def check_guide_dir(path: str | Path) -> Path:
    """The guide folder `path` names, checked without loading it: no pickles, config fields of the right types
    and ranges, a readable safetensors file."""
    path = Path(path)
    shipped = {p.name: p for p in shipped_guide_dirs()}
    if not path.exists() and str(path) in shipped:
        path = shipped[str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"guide folder {str(path)!r} does not exist (shipped guides: {', '.join(shipped)})")
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"{path} holds pickle weights {pickles}; pnpguide never unpickles (it can run code): convert them to safetensors")
    if not (path / "config.json").is_file() or not (path / GUIDE_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a guide folder: it needs config.json and {GUIDE_WEIGHTS} (made by `pnpguide distill`)")
    design_class(check_guide_config(path / "config.json"))  # a design pnpguide no longer has fails here, in one line
    try:
        with safe_open(str(path / GUIDE_WEIGHTS), framework="pt") as weights:
            list(weights.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path / GUIDE_WEIGHTS} is corrupt or truncated ({error}); re-download or retrain the guide") from error
    return path


def check_guide_fits_base(guide: str | Path, base: str | Path) -> None:
    """One line before any weights load when the guide was built for another UNet (an SDXL guide on an SD 1.5
    base, or the reverse; other widths): see :func:`guide_base_mismatch`."""
    problem = guide_base_mismatch(guide, base)
    if problem:
        raise ValueError(problem)


def guide_base_mismatch(guide: str | Path, base: str | Path, compare=unet_mismatch) -> str | None:
    """Why the guide cannot fit the base's UNet, from the two config.json files (their classes' defaults filled
    in) and `compare` (guide.unet_mismatch, or guide.conditioning_mismatch for the kind alone), or None; broken
    folders raise as check_guide_dir and check_model_dir do."""
    guide_dir, base_dir = check_guide_dir(guide), check_model_dir(base)
    design = design_class(read_json_object(guide_dir / "config.json"))
    problem = compare(_with_defaults(design, guide_dir / "config.json"), _with_defaults(UNet2DConditionModel, base_dir / "unet" / "config.json"))
    return f"guide {guide_dir} does not fit base {base_dir}: {problem}" if problem else None


def _with_defaults(config_class, path: Path) -> dict:
    parameters = inspect.signature(config_class.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty} | read_json_object(path)


def load_plug_and_play(
    base: str | Path | None = None, guide: str | Path | None = None, lora: str | Path | None = None,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> PlugAndPlayPipeline | PlugAndPlayXLPipeline:
    """Base SD or SDXL folder (default: embedded) + guide folder + optional LoRA, as a PlugAndPlayPipeline or, for an
    SDXL base, a PlugAndPlayXLPipeline, in `dtype` on `device` (the guide follows the UNet: see `pipeline.follow_unet`).
    The guide defaults to the shipped default one for the embedded base only (it fits no other); a base of your own
    without a guide gives a pipeline for modes "cfg" and "none"."""
    guide = guide if guide is not None or base is not None else default_guide_dir()
    guide_model = None
    if guide is not None:
        check_guide_fits_base(guide, base or default_base_dir())  # before any weights load
        guide_model = load_guide(guide)
    sd = load_pipeline(base, lora, dtype, device)
    if guide_model is not None:
        guide_model.check_compatible(sd.unet)
    return plug_and_play_from(sd, guide_model)


def plug_and_play_from(pipe, guide: GuideModel | None = None) -> PlugAndPlayPipeline | PlugAndPlayXLPipeline:
    """A loaded SD or SDXL pipeline as pnpguide's twin of its class, sharing its components, with `guide`."""
    twin = PlugAndPlayXLPipeline if isinstance(pipe, StableDiffusionXLPipeline) else PlugAndPlayPipeline
    new = twin.from_pipe(pipe, guide=guide)
    new.set_progress_bar_config(disable=True)
    return new
