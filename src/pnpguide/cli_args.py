"""What the command groups share: argparse types, flags made from config dataclasses, and the device flags."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing


def count(text: str) -> int:
    """An argparse type: an integer >= 1 (images, prompts, steps)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def whole_number(text: str) -> int:
    """An argparse type: an integer >= 0 (steps of a kind, where none is allowed)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def guidance_scale(text: str) -> float:
    """An argparse type: a finite w > 0 (diffusers' convention: 1 = no guidance)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (1 = no guidance), got {text}")
    return value


def field_comments(config_class) -> dict[str, str]:
    """The `# comment` beside each field in the config's source: the field's documentation, written once."""
    comments: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        if dataclasses.is_dataclass(klass):
            for match in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(klass), re.MULTILINE):
                comments[match.group(1)] = match.group(2)
    return comments


def add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per dataclass field, so each default lives in the config alone (guided-diffusion's idea).

    List fields take one or more values and may be repeated (`--base a --base b` = `--base a b`)."""
    hints = typing.get_type_hints(config_class)
    comments = field_comments(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = _default(field)
        comment = comments.get(field.name, field.name.replace("_", " "))
        help_text = (comment if "(default:" in comment else f"{comment} (default: {default})").replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        base = _without_none(kind)
        if typing.get_origin(base) is list:
            parser.add_argument(flag, type=typing.get_args(base)[0], nargs="+", action="extend", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=base, default=default, help=help_text)


def _without_none(kind):
    """`X | None` -> X; anything else unchanged."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return next(t for t in typing.get_args(kind) if t is not type(None))
    return kind


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def config_from_args(config_class, args: argparse.Namespace):
    """The config from parsed flags; list flags left out keep the config's default."""
    fields = dataclasses.fields(config_class)
    return config_class(**{f.name: _default(f) if getattr(args, f.name) is None else getattr(args, f.name) for f in fields})


def placement(args):
    """(torch.device, torch.dtype) from --device and --dtype, checked to run here before any model loads."""
    from .devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="weights and activations; bfloat16 also speeds up CPU sampling (default: float32)")
