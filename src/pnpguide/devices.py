"""Where and in what precision sampling runs: `--device` and `--dtype`, checked before any model is loaded.

A wrong choice (`--device cuda` on a machine without CUDA, bf16 on a GPU without it) otherwise fails minutes
later, deep inside a kernel, with a message that names neither the flag nor a fix.
"""

from __future__ import annotations

import warnings

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def default_device() -> str:
    """cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None = None) -> torch.device:
    """The device `name` names ("auto"/None: :func:`default_device`), checked to exist on this machine."""
    name = default_device() if name in (None, "auto") else name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available here: use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype `name` names (float32, float16, bfloat16, or fp32/fp16/bf16), checked to run on `device`."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = DTYPE_ALIASES.get(name, name)
        if key not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[key]
    device = torch.device(device)
    _check_runs(dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        warnings.warn("float16 on the CPU runs, but torch's CPU half-precision convolutions make the VAE very slow: "
                      "bfloat16 is the fast half precision there")
    return dtype


def _check_runs(dtype: torch.dtype, device: torch.device) -> None:
    """Run the kinds of kernel a UNet needs (conv, group norm, matmul) once on a few numbers: kernels that a device
    lacks raise here, in one line, instead of inside the first sampling step."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) does not support bfloat16: use --dtype float16")
    try:
        x = torch.ones(1, 8, 4, 4, dtype=dtype, device=device)
        y = torch.nn.functional.conv2d(x, torch.ones(8, 8, 3, 3, dtype=dtype, device=device), padding=1)
        y = torch.nn.functional.group_norm(y, 4)
        (y.flatten(1) @ torch.ones(128, 8, dtype=dtype, device=device)).sum()
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{device.type} cannot run {dtype} here ({' '.join(str(error).split())[:120]}): pick another --dtype") from None
