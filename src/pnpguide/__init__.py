"""pnpguide: Plug-and-Play Diffusion Distillation for Stable-Diffusion-family models."""

__version__ = "0.1.0"
