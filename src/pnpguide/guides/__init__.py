"""The guide designs: one class each, over what they share (:class:`GuideModel`).

- :class:`OutputGuide` (the default): a small network after the UNet that predicts CFG's `cond - uncond` from x_t
  and the UNet's conditional output, so a step is `cond + (w - 1) * prediction`, CFG with the unconditional pass
  predicted.
- :class:`ResidualGuide` (the paper's design, Hsiao et al. 2024): a narrow copy of the UNet's encoder whose residuals
  enter the UNet's skip connections, as ControlNet's do.

`GuideModel.from_pretrained(folder or shipped name)` returns the design the folder's config names.
"""

from .base import GuideModel, shipped_guides, text_encoder_signature, unet_mismatch
from .output import OutputCorrection, OutputGuide
from .residual import GuideOutput, ResidualGuide

__all__ = ["GuideModel", "GuideOutput", "OutputCorrection", "OutputGuide", "ResidualGuide", "shipped_guides",
           "text_encoder_signature", "unet_mismatch"]
