"""pnpguide: Plug-and-Play Diffusion Distillation for Stable-Diffusion-family models.

The public names are imported on first use (PEP 562), so `import pnpguide` and `pnpguide --help` do not
pay for importing diffusers and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "CorrectionCarry": "carry",
    "GuidancePolicy": "policy",
    "GuideModel": "guides",
    "GuideOutput": "guides",
    "OutputGuide": "guides",
    "ResidualGuide": "guides",
    "PlugAndPlayPipeline": "pipeline",
    "PlugAndPlayXLPipeline": "pipeline_xl",
    "cfg_combine": "teacher",
    "cfg_noise_pred": "teacher",
    "guided_noise_pred": "teacher",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pnpguide' has no attribute {name!r}")
    return getattr(_import_quietly(_EXPORTS[name]), name)


def _import_quietly(module: str):
    """Importing diffusers' pipelines makes transformers warn that CLIPImageProcessor falls back to PIL without
    torchvision: true, harmless, and nothing a pnpguide user can act on, so it is silenced for this import."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return importlib.import_module(f".{module}", __name__)
    finally:
        transformers_logging.set_verbosity(verbosity)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
