"""What every guide design shares: loading a folder as the design its config names, the checks that it fits a UNet
and a text encoder, and the sampling policy the folder records.

A guide folder is self-contained: `config.json` (the design, and what it was trained for), the weights
(safetensors), `correction_carry.json` when the guide runs only the first steps and its correction is carried on
after them, and a model card (`README.md`). :meth:`GuideModel.from_pretrained` loads all of it and
:attr:`GuideModel.policy` is how the pipeline samples it by default, so Python and the command line sample a guide
the same way.

What a guide records of its training (each design's config takes these fields):
- `trained_guidance_range`: the w it saw, (w_min, w_max); the pipeline warns outside it.
- `trained_text_encoder`: the text encoder(s) whose embeddings it read; another base's is refused.
- `trained_timesteps`, `trained_schedule`: a step-distilled guide's grid and its DDIM config; it samples on them.
- `default_guidance_interval`: (t_low, t_high) where its guidance was measured to pay, used without a negative prompt.
- (output guides) `trained_first_steps`: it learnt the first N steps of a 25-step run, its correction carried after;
  `negative_first_steps`: its negative head learnt more of them, run with a negative prompt.
  `step_heads`: timesteps with a prompt head of their own, trained at those steps alone.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..carry import GUIDE_CARRY_FILE, CorrectionCarry
from ..policy import GuidancePolicy
from ..quiet import quiet_casts

SHIPPED_GUIDES_DIR = Path(__file__).resolve().parent.parent / "assets" / "guides"  # guides for the embedded base, by name
DEFAULT_GUIDE = "default"  # the shipped guide a pipeline on the embedded base gets when none is named


class GuideModel(ModelMixin, AttentionMixin, ConfigMixin):
    """Base class of the guide designs. `GuideModel.from_pretrained(path or shipped name)` loads the design the
    folder's config names (:class:`pnpguide.OutputGuide` or :class:`pnpguide.ResidualGuide`), with its policy."""

    correction_carry: CorrectionCarry | None = None  # loaded from the folder (a guide trained on the first steps)
    designs: dict[str, type["GuideModel"]] = {}  # every design by class name, filled as each is defined

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        GuideModel.designs[cls.__name__] = cls

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "GuideModel":
        """ModelMixin's `from_pretrained` for a folder, a shipped guide's name (default, 8-step, 4-step, paper) or a Hub
        id; on the base class, the design comes from the folder's config. The folder's correction carry is loaded."""
        folder = resolve_guide_folder(pretrained_model_name_or_path) / (kwargs.pop("subfolder", None) or "")
        design = cls if cls is not GuideModel else design_class(json.loads((folder / "config.json").read_text()))
        guide = super(GuideModel, design).from_pretrained(str(folder), **kwargs)
        carry_file = folder / GUIDE_CARRY_FILE
        guide.correction_carry = CorrectionCarry.load(carry_file) if carry_file.is_file() else None
        return guide

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' `load_config`, with a config saved by an older pnpguide (one `GuideModel` class for every design)
        translated to this design's fields, so old folders load without warnings about fields it no longer has."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if config.get("_class_name") == "GuideModel":
            config = cls.translated_config(config)
        return (config, *loaded[1:]) if isinstance(loaded, tuple) else config

    @classmethod
    def translated_config(cls, config: dict) -> dict:
        """An older pnpguide's config as this design's: its uniform step grid as `trained_timesteps`."""
        config = dict(config, _class_name=cls.__name__)
        counts, schedule = config.pop("trained_step_counts", None), config.get("trained_schedule")
        if counts and schedule and not config.get("trained_timesteps"):
            config["trained_timesteps"] = ddim_timesteps(schedule, counts[0])
        for unsupported in ("reads_negative", "scale_by_guidance"):
            if config.pop(unsupported, False):
                raise ValueError(f"this guide was built with {unsupported}, an option pnpguide no longer has (a negative head and "
                                 "the output design replaced it): retrain it with pnpguide distill")
        return config

    def to(self, *args, **kwargs):
        with quiet_casts():
            return super().to(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """ModelMixin's `save_pretrained`, plus the correction carry, so the folder samples as this guide does."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.correction_carry is not None:
            self.correction_carry.save(Path(save_directory) / GUIDE_CARRY_FILE)

    @property
    def policy(self) -> GuidancePolicy:
        """How the pipeline samples this guide when a call gives no policy: from its config and carry (see the module)."""
        return GuidancePolicy.for_guide(self.config, self.correction_carry)

    def check_compatible(self, unet) -> None:
        """Raise ValueError naming the first architecture value in which `unet` differs from the guide's."""
        problem = unet_mismatch(self.config, unet.config)
        if problem:
            raise ValueError(problem)
        if getattr(unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError("this UNet embeds the guidance scale itself (time_cond_proj_dim, as LCM's does) and runs no CFG "
                             "for a guide to stand in for: sample it without a guide")

    def check_text_encoder(self, text_encoder, text_encoder_2=None) -> None:
        """Raise ValueError when the guide was distilled with other text encoders than these (SDXL: both): the
        prompt embeddings it reads would mean something else, even where their width is the same. A record of
        the first encoder alone is accepted for an SDXL base (the second is then not checked)."""
        trained, this = self.config.trained_text_encoder, text_encoder_signature(text_encoder, text_encoder_2)
        if trained is None and text_encoder is not None and self.config.trained_guidance_range is not None:
            warnings.warn(unrecorded_text_encoder(this))
        if trained is not None and text_encoder is not None and trained not in (this, text_encoder_signature(text_encoder)):
            raise ValueError(f"guide was trained for another base, with text encoder {trained}; this base has {this}: retrain it here (pnpguide distill --base ...)")

    def time_embedding_of(self, timestep, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The guide's time embedding, cast to the activations' dtype (the sinusoidal projection is always fp32)."""
        return self.time_embedding(self.time_proj(per_sample(timestep, batch, self.device)).to(dtype))


OLDER_DESIGNS = {"unet_output": "OutputGuide", "latent": "ResidualGuide"}  # an older pnpguide's `reads` -> the design


def design_class(config: dict) -> type[GuideModel]:
    """The design a config describes: its `_class_name`, or for an older pnpguide's `GuideModel`, its `reads`."""
    name = config.get("_class_name")
    if name == "GuideModel":
        reads = config.get("reads", "latent")
        if reads not in OLDER_DESIGNS:
            raise ValueError(f"this guide reads {reads!r}, a design pnpguide no longer has (the output design replaced it): "
                             "retrain it with pnpguide distill")
        name = OLDER_DESIGNS[reads]
    if name not in GuideModel.designs:
        raise ValueError(f"config names {name!r}, not a pnpguide guide ({', '.join(GuideModel.designs)})")
    return GuideModel.designs[name]


def resolve_guide_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder, a shipped guide's name, or a Hub id (downloaded, or from the cache offline); else one line listing
    the shipped guides."""
    path, shipped = Path(name_or_path), shipped_guides()
    if path.is_dir():
        return path
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    listed = f"shipped guides: {', '.join(shipped)}"
    if str(name_or_path).count("/") != 1 or path.exists():
        raise FileNotFoundError(f"no guide folder or shipped guide named {str(name_or_path)!r} ({listed})")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path)))
    except Exception as error:  # offline, unknown repository, no access: all one line for the user
        raise OSError(f"could not get guide {str(name_or_path)!r} from the Hub ({' '.join(str(error).split())}) ({listed})") from error


def shipped_guides() -> dict[str, Path]:
    """The guides shipped for the embedded base, by name."""
    if not SHIPPED_GUIDES_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_GUIDES_DIR.iterdir()) if (p / "config.json").is_file()}


def ddim_timesteps(scheduler_config: dict, num_steps: int) -> list[int]:
    """The timesteps a DDIM sampler with this config evaluates the model at in `num_steps` steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]


UNET_KINDS = {None: "an SD 1.x/2.x UNet (no added conditioning)", "text_time": "an SDXL UNet (text_time size/crop conditioning)"}


def conditioning_mismatch(guide_config, unet_config) -> str | None:
    """An SDXL guide on an SD 1.x/2.x UNet or the reverse, in words (None: the same kind): the guide reads, or
    lacks, SDXL's pooled-prompt and size/crop embedding, so nothing else about it can fit."""
    guide_kind, unet_kind = guide_config.get("addition_embed_type"), unet_config.get("addition_embed_type")
    if guide_kind == unet_kind:
        return None
    described = lambda kind: UNET_KINDS.get(kind, f"a UNet with addition_embed_type={kind!r}")  # noqa: E731
    return f"guide built for {described(guide_kind)}, this base has {described(unet_kind)}; use a guide distilled on this base (pnpguide distill --base ...)"


def unet_mismatch(guide_config, unet_config) -> str | None:
    """The first architecture value in which a UNet config differs from the one a guide config was built for, in
    words (None: they fit). Mappings, so a preflight can compare two config.json files before loading weights."""
    kind_problem = conditioning_mismatch(guide_config, unet_config)
    if kind_problem:
        return kind_problem
    expected = {
        "in_channels": (guide_config.get("unet_in_channels"), unet_config.get("in_channels")),
        "cross_attention_dim": (guide_config.get("unet_cross_attention_dim"), unet_config.get("cross_attention_dim")),
        "block_out_channels": (tuple(guide_config.get("unet_block_out_channels")), tuple(unet_config.get("block_out_channels"))),
        "layers_per_block": (guide_config.get("layers_per_block"), unet_config.get("layers_per_block")),
    }
    for name, (ours, theirs) in expected.items():
        if ours != theirs:
            return f"guide built for {name}={ours}, this UNet has {theirs}; retrain or pick the matching guide"
    return None


def unrecorded_text_encoder(this: str) -> str:
    """Why a trained guide that does not record its text encoder cannot be checked against this base's (one line)."""
    return (f"this guide does not record the text encoder it was trained with, so it cannot be checked against this base's "
            f"({this}); if it was trained on another base its images will be wrong: retrain it here (pnpguide distill --base ...)")


def text_encoder_signature(text_encoder, text_encoder_2=None) -> str | None:
    """A text encoder's architecture in words, recorded in a guide at training time: 'BertModel (6 layers, 384 wide,
    vocab 30522)'; with SDXL's second encoder, both joined by ' + '."""
    if text_encoder is None:
        return None
    config = text_encoder.config
    words = f"{type(text_encoder).__name__} ({config.num_hidden_layers} layers, {config.hidden_size} wide, vocab {config.vocab_size})"
    return words if text_encoder_2 is None else f"{words} + {text_encoder_signature(text_encoder_2)}"


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialised: an untrained guide adds exact zeros, so it changes nothing until it is trained."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def per_sample(value: torch.Tensor | float | int, batch: int, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A scalar or (batch,) value as a (batch,) tensor on `device`. A Python number is filled in on the device
    (`torch.full`) rather than copied from the host (`torch.as_tensor`), which on a GPU would wait at every step."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype or value.dtype).reshape(-1).expand(batch)
    return torch.full((batch,), value, device=device, dtype=dtype or (torch.int64 if isinstance(value, int) else torch.float32))
