"""Field-by-field checks of the JSON configs pnpguide reads (a guide's, a base's UNet and scheduler) and of the
training configs' field types, so a bad value is one line naming the file, the field, the value and what was
expected, instead of a TypeError from deep inside diffusers.

Each config has one table: field name -> :class:`Expect`. Fields missing from a file are left to the class's
defaults; fields not in a table are not checked. A new `GuideModel.__init__` argument needs a row in
:data:`GUIDE_FIELDS` (tests/test_config_checks.py checks that every argument has one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class ConfigError(ValueError):
    """A config file or config object with a field of the wrong type or out of range."""


@dataclass(frozen=True)
class Expect:
    """What a field must be: a test and the words for it in an error message."""

    description: str
    test: Callable[[object], bool]

    def __or__(self, other: "Expect") -> "Expect":
        return Expect(f"{self.description} or {other.description}", lambda v: self.test(v) or other.test(v))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a channel count


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def list_of(item: Expect, length: int | None = None) -> Expect:
    size = f"{length} " if length else "non-empty "
    return Expect(
        f"a {size}list of {_plural(item.description)}",
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and (length is None or len(v) == length) and all(map(item.test, v)),
    )


def _plural(description: str) -> str:
    """"a positive integer" -> "positive integers" """
    return description.removeprefix("a ").removeprefix("an ") + "s"


def one_of(*values: str) -> Expect:
    return Expect(f"one of {', '.join(map(repr, values))}", lambda v: v in values)


def optional(expect: Expect) -> Expect:
    return Expect(f"{expect.description} or null", lambda v: v is None or expect.test(v))


INT = Expect("an integer", _is_int)
POSITIVE_INT = Expect("a positive integer", lambda v: _is_int(v) and v > 0)
POSITIVE_NUMBER = Expect("a positive number", lambda v: _is_number(v) and v > 0)
BOOL = Expect("true or false", lambda v: isinstance(v, bool))
NAME = Expect("a string", lambda v: isinstance(v, str) and v != "")
OBJECT = Expect("a JSON object", lambda v: isinstance(v, dict))
GUIDANCE_RANGE = Expect(
    "[w_min, w_max] with 1 <= w_min <= w_max", lambda v: list_of(Expect("a number", _is_number), 2).test(v) and 1 <= v[0] <= v[1]
)
TIMESTEP_RANGE = Expect(
    "[t_low, t_high] with 0 <= t_low <= t_high", lambda v: list_of(Expect("a number", _is_number), 2).test(v) and 0 <= v[0] <= v[1]
)
PER_BLOCK_INT = POSITIVE_INT | list_of(POSITIVE_INT)

GUIDE_FIELDS = {  # both designs' fields, and those older pnpguide versions wrote (GuideModel.translated_config reads them)
    "size": one_of("tiny", "full"),
    "width": POSITIVE_INT,
    "block_out_channels": list_of(POSITIVE_INT),
    "unet_block_out_channels": list_of(POSITIVE_INT),
    "unet_in_channels": POSITIVE_INT,
    "unet_out_channels": optional(POSITIVE_INT),
    "unet_cross_attention_dim": POSITIVE_INT,
    "down_block_types": list_of(NAME),
    "layers_per_block": POSITIVE_INT,
    "transformer_layers_per_block": PER_BLOCK_INT,
    "num_attention_heads": PER_BLOCK_INT,
    "use_linear_projection": BOOL,
    "norm_num_groups": POSITIVE_INT,
    "norm_eps": POSITIVE_NUMBER,
    "flip_sin_to_cos": BOOL,
    "freq_shift": INT,
    "guidance_embed_dim": POSITIVE_INT,
    "addition_embed_type": optional(one_of("text_time")),
    "addition_time_embed_dim": optional(POSITIVE_INT),
    "projection_class_embeddings_input_dim": optional(POSITIVE_INT),
    "trained_guidance_range": optional(GUIDANCE_RANGE),
    "trained_step_counts": optional(list_of(POSITIVE_INT)),
    "trained_timesteps": optional(list_of(INT)),
    "trained_first_steps": optional(POSITIVE_INT),
    "trained_schedule": optional(OBJECT),
    "reads": one_of("latent", "unet_features", "unet_output"),
    "scale_by_guidance": BOOL,
    "trained_text_encoder": optional(NAME),
    "reads_negative": BOOL,
    "negative_head": BOOL,
    "negative_first_steps": optional(POSITIVE_INT),
    "step_heads": optional(list_of(INT)),
    "default_guidance_interval": optional(TIMESTEP_RANGE),
}
GUIDE_PER_BLOCK = ("block_out_channels", "unet_block_out_channels", "down_block_types", "transformer_layers_per_block", "num_attention_heads")

# The UNet2DConditionModel fields pnpguide builds guides from, samples with, or compares guides against.
UNET_FIELDS = {
    "in_channels": POSITIVE_INT,
    "out_channels": POSITIVE_INT,
    "sample_size": optional(POSITIVE_INT | list_of(POSITIVE_INT, 2)),
    "cross_attention_dim": POSITIVE_INT,
    "block_out_channels": list_of(POSITIVE_INT),
    "layers_per_block": POSITIVE_INT,
    "down_block_types": list_of(NAME),
    "up_block_types": list_of(NAME),
    "attention_head_dim": optional(PER_BLOCK_INT),
    "num_attention_heads": optional(PER_BLOCK_INT),
    "transformer_layers_per_block": PER_BLOCK_INT,
    "use_linear_projection": BOOL,
    "norm_num_groups": optional(POSITIVE_INT),
    "norm_eps": POSITIVE_NUMBER,
    "flip_sin_to_cos": BOOL,
    "freq_shift": INT,
    "mid_block_type": optional(NAME),
    "addition_embed_type": optional(NAME),
    "addition_time_embed_dim": optional(POSITIVE_INT),
    "projection_class_embeddings_input_dim": optional(POSITIVE_INT),
}
UNET_PER_BLOCK = ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block")

SCHEDULER_FIELDS = {
    "num_train_timesteps": POSITIVE_INT,
    "prediction_type": NAME,
    "beta_start": POSITIVE_NUMBER,
    "beta_end": POSITIVE_NUMBER,
    "beta_schedule": NAME,
    "timestep_spacing": NAME,
}


def read_json_object(path: str | Path) -> dict:
    """A config file's JSON object; a parse error is an OSError naming the file, as diffusers reports it."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OSError(f"{path} is not a valid JSON file ({error})") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds {type(config).__name__} JSON; expected a JSON object of config fields")
    return config


def field_problems(config: dict, table: dict[str, Expect], per_block: tuple[str, ...] = ()) -> list[str]:
    """One phrase per bad field; then, among `per_block` fields given as lists, lengths that disagree."""
    problems = [
        f"{json.dumps(name)} is {json.dumps(config[name])}; expected {expect.description}"
        for name, expect in table.items()
        if name in config and not expect.test(config[name])
    ]
    lengths = {name: len(config[name]) for name in per_block if isinstance(config.get(name), (list, tuple)) and table[name].test(config[name])}
    if len(set(lengths.values())) > 1:
        problems.append("per-block fields have different lengths (" + ", ".join(f"{k}: {v}" for k, v in lengths.items()) + "); expected one entry per block")
    return problems


def check_config_file(path: str | Path, table: dict[str, Expect], per_block: tuple[str, ...] = ()) -> dict:
    """Read a JSON config and raise :class:`ConfigError` listing every bad field, in one line."""
    config = read_json_object(path)
    problems = field_problems(config, table, per_block)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return config


def check_guide_config(path: str | Path) -> dict:
    return check_config_file(path, GUIDE_FIELDS, GUIDE_PER_BLOCK)


def check_base_configs(base_dir: str | Path) -> None:
    """The UNet's and the scheduler's config of a Stable Diffusion folder, where present."""
    base_dir = Path(base_dir)
    for file, table, per_block in (
        (base_dir / "unet" / "config.json", UNET_FIELDS, UNET_PER_BLOCK),
        (base_dir / "scheduler" / "scheduler_config.json", SCHEDULER_FIELDS, ()),
    ):
        if file.is_file():
            check_config_file(file, table, per_block)
    check_text_widths(base_dir)


def check_text_widths(base_dir: str | Path) -> None:
    """The UNet reads what the text encoders give: cross_attention_dim = their hidden sizes summed (SDXL
    concatenates both encoders' tokens) and, for SDXL, the added embedding's input = 6 size/crop ids x
    addition_time_embed_dim + the second encoder's projection. Otherwise diffusers fails at the first step
    with a shape error; here it is one line before loading, naming the model files that disagree."""
    base_dir = Path(base_dir)
    unet_file = base_dir / "unet" / "config.json"
    files = [f for f in (base_dir / "text_encoder" / "config.json", base_dir / "text_encoder_2" / "config.json") if f.is_file()]
    if not unet_file.is_file() or not files:
        return
    unet, encoders = read_json_object(unet_file), [read_json_object(f) for f in files]
    widths = [e.get("hidden_size") for e in encoders]
    if all(_is_int(w) for w in widths) and _is_int(unet.get("cross_attention_dim")) and sum(widths) != unet["cross_attention_dim"]:
        parts = " + ".join(f"{f.parent.name} {w}" for f, w in zip(files, widths))
        raise ConfigError(f"{unet_file}: \"cross_attention_dim\" is {unet['cross_attention_dim']} but the text encoders give {sum(widths)}-wide embeddings "
                          f"({parts}): the UNet and text encoders come from different models")
    projection = encoders[-1].get("projection_dim") if len(files) == 2 else None
    if unet.get("addition_embed_type") == "text_time" and _is_int(projection) and _is_int(unet.get("addition_time_embed_dim")):
        expected = 6 * unet["addition_time_embed_dim"] + projection
        if unet.get("projection_class_embeddings_input_dim") != expected:
            raise ConfigError(f"{unet_file}: \"projection_class_embeddings_input_dim\" is {unet.get('projection_class_embeddings_input_dim')}; "
                              f"SDXL's added embedding takes 6 x addition_time_embed_dim ({unet['addition_time_embed_dim']}) + text_encoder_2's "
                              f"projection_dim ({projection}) = {expected}: the UNet and text encoders come from different models")


# ----------------------------------------------------------------------------------------------------------------
# training config dataclasses


def _type_expect(kind) -> Expect:
    """An Expect for a dataclass field's annotation: int, float, str, bool, list[...] and `X | None`."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        parts = [_type_expect(k) for k in typing.get_args(kind) if k is not type(None)]
        return optional(parts[0]) if len(parts) == 1 else parts[0] | parts[1]
    if typing.get_origin(kind) is list:
        item = _type_expect(typing.get_args(kind)[0])
        return Expect(f"a list of {_plural(item.description)}", lambda v: isinstance(v, list) and all(map(item.test, v)))
    simple = {int: INT, float: Expect("a number", lambda v: _is_int(v) or isinstance(v, float)), bool: BOOL}
    return simple.get(kind, Expect(f"a {getattr(kind, '__name__', kind)}", lambda v: isinstance(v, kind)))


def check_field_types(config) -> None:
    """Every field of a config dataclass has its annotated type (a Python caller may pass "3" for 3)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        expect, value = _type_expect(hints[field.name]), getattr(config, field.name)
        if not expect.test(value):
            raise ConfigError(f"{field.name} is {value!r}; expected {expect.description}")


def check_fraction(config, *names: str) -> None:
    """Shares and probabilities: each named field must be in [0, 1]."""
    for name in names:
        value = getattr(config, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"{name} must be in [0, 1], got {value}")


def check_at_least(config, minimum: float, *names: str) -> None:
    """Counts and sizes: each named field must be >= `minimum`."""
    for name in names:
        value = getattr(config, name)
        if not value >= minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")
