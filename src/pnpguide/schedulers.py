"""Sampler names as users know them (`--scheduler dpm++-2m`), mapped to diffusers scheduler classes.

A scheduler is built with `.from_config(pipe.scheduler.config)`, as diffusers documents swapping one: the base's
noise schedule (betas, prediction type, timestep spacing) is kept and only the solver changes. The guide is a
model of the noise prediction at one step, so it works with any solver, like the UNet it corrects.
"""

from __future__ import annotations

import importlib

# name -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),  # two model calls per step
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm++-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm-singlestep": ("DPMSolverSinglestepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def check_scheduler_name(name: str) -> str:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    return name


def scheduler_from_name(name: str, config):
    """A new diffusers scheduler of the kind `name` names, from another scheduler's `config`."""
    class_name, overrides = SCHEDULERS[check_scheduler_name(name)]
    scheduler_class = getattr(importlib.import_module("diffusers"), class_name)
    return scheduler_class.from_config(config, **overrides)
