"""pnpguide: Plug-and-Play Diffusion Distillation for Stable-Diffusion-family models."""

from transformers.utils import logging as _transformers_logging

# Importing diffusers' pipelines makes transformers warn that CLIPImageProcessor falls back to PIL without
# torchvision: true, harmless, and nothing a pnpguide user can act on, so it is silenced for this import only.
_verbosity = _transformers_logging.get_verbosity()
_transformers_logging.set_verbosity_error()
from .guide import GuideModel, GuideOutput  # noqa: E402
from .pipeline import PlugAndPlayPipeline  # noqa: E402
from .teacher import cfg_combine, cfg_noise_pred, guided_noise_pred  # noqa: E402

_transformers_logging.set_verbosity(_verbosity)

__version__ = "0.1.0"
__all__ = ["GuideModel", "GuideOutput", "PlugAndPlayPipeline", "cfg_combine", "cfg_noise_pred", "guided_noise_pred"]
