"""pnpguide: Plug-and-Play Diffusion Distillation for Stable-Diffusion-family models."""

from .guide import GuideModel, GuideOutput
from .pipeline import PlugAndPlayPipeline
from .teacher import cfg_combine, cfg_noise_pred, guided_noise_pred

__version__ = "0.1.0"
__all__ = ["GuideModel", "GuideOutput", "PlugAndPlayPipeline", "cfg_combine", "cfg_noise_pred", "guided_noise_pred"]
