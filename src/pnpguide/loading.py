"""Finding and loading models: the shipped guides, user guides, and a base + guide (+ LoRA) pipeline."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from .base import ASSETS_DIR, load_pipeline
from .config_checks import check_guide_config
from .guide import GuideModel
from .pipeline import PlugAndPlayPipeline

GUIDE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def default_guide_dir(size: str = "tiny") -> Path:
    """The guide shipped for the embedded base model."""
    return ASSETS_DIR / "guides" / size


def shipped_guide_dirs() -> list[Path]:
    """Every guide shipped for the embedded base: tiny, full, and the step-distilled ones."""
    folder = default_guide_dir("tiny").parent
    return sorted(p for p in folder.iterdir() if (p / "config.json").is_file())


def load_guide(path: str | Path) -> GuideModel:
    """Load a guide folder (or a shipped guide by name: tiny, full, tiny-16step, ...) after :func:`check_guide_dir`."""
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
    check_guide_config(path / "config.json")
    try:
        with safe_open(str(path / GUIDE_WEIGHTS), framework="pt") as weights:
            list(weights.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path / GUIDE_WEIGHTS} is corrupt or truncated ({error}); re-download or retrain the guide") from error
    return path


def load_plug_and_play(base: str | Path | None = None, guide: str | Path | None = None, lora: str | Path | None = None) -> PlugAndPlayPipeline:
    """Base SD folder (default: embedded) + guide folder (default: the shipped tiny guide) + optional LoRA."""
    guide_model = load_guide(guide or default_guide_dir("tiny"))  # first: a bad guide path fails before the slow part
    sd = load_pipeline(base, lora)
    guide_model.check_compatible(sd.unet)
    pipe = PlugAndPlayPipeline.from_pipe(sd, guide=guide_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe
