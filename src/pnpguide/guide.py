"""`pnpguide.guide.GuideModel`: the name older guide folders and saved pipelines record; the designs are in
:mod:`pnpguide.guides`."""

from .guides import GuideModel, GuideOutput, OutputCorrection, OutputGuide, ResidualGuide

__all__ = ["GuideModel", "GuideOutput", "OutputCorrection", "OutputGuide", "ResidualGuide"]
