"""The methods `pnpguide eval` compares and how each samples its images, measured against the CFG teacher as it goes."""

from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..conditioning import Conditioning
from ..pipeline import PlugAndPlayPipeline
from ..schedules import guided_at
from .negative_prompts import batch_rows, pipeline_kwargs
from .speed import UNetCallCounter
from .teacher_states import TeacherTrajectory, negative_inputs

FIDELITY_SUBSET = 64  # images whose per-step model outputs are compared with the teacher's (one extra model call per step and row)
FIRST_STEP_FIT = " + fit"  # suffix of a guide's row sampled with a FirstStepFit (--first-step-fit)
NO_NEGATIVE = " (no neg)"  # suffix of a guide's row sampled without the negative prompts, beside its row with them
CFG_FIRST = " + cfg {}"  # suffix of a guide's row that runs CFG for its first {} steps (--cfg-first-steps)
CARRY = "cfg + carry {}"  # the row of CFG in full for {} steps, then its correction carried (--correction-carry)
GUIDE_CARRY = " + carry {}"  # suffix of an output guide's row that runs the guide for its first {} steps, then carries its correction
CARRY_FIT_PROMPTS = 16  # prompts CorrectionCarry.fit samples CFG on, once per evaluation and step count


@dataclass(frozen=True)
class Method:
    name: str  # "none", "cfg", "guide:<name>" or (negative prompts) "guide:<name> (no neg)"
    mode: str
    guide: object | None = None  # a GuideModel
    step_counts: tuple[int, ...] | None = None  # a step-distilled guide: only these
    negative_prompt: bool = False  # samples with the evaluation's negative prompts (--negative-prompts)
    cfg_first_steps: int = 0  # a guide: the first steps run CFG (the pipeline's cfg_first_steps)
    first_step_fit: bool = False  # a guide: the first step runs CFG in one pass, its unconditional pass from a FirstStepFit
    carry_full_steps: int = 0  # CFG (mode "carry") or an output guide for these first steps, then its correction carried (CorrectionCarry)

    def runs_at(self, steps: int) -> bool:
        return self.step_counts is None or steps in self.step_counts


@torch.no_grad()
def sample(pipe: PlugAndPlayPipeline, method: Method, prompts: list[str], steps: int, w: float, seed: int, batch_size: int,
           negative: Conditioning | None = None, teacher_scale: float | None = None,
           trajectory: TeacherTrajectory | None = None, guidance_interval: tuple[float, float] | None = None,
           ) -> tuple[list[Image.Image], float | None, tuple[int, int]]:
    """Images i from the generator seeded `seed * 1_000_003 + i`; with `negative` (CFG's unconditional input: one
    row, :func:`pnpguide.conditioning.encode_negative`, or one per prompt with negative prompts), also the mean per-step
    squared error between the method's model output and the CFG teacher's (at `teacher_scale`, default w) on the
    method's own trajectory, for the first FIDELITY_SUBSET images. The cfg method instead records its states
    for those images into `trajectory`, if given. A method with `negative_prompt` samples with its rows of `negative`.
    With `guidance_interval`, every method (and the teacher it is
    compared with) uses w only at timesteps inside it and is the conditional model elsewhere. Also returns the
    images the UNet and the guide processed, teacher calls for the comparison left out (steps at w = 1 skip the guide)."""
    pipe.guide = method.guide
    counter, errors, images = UNetCallCounter(pipe.unet), [], []
    with counter.paused():  # one-off calibrations, not a cost per image
        sampling = sampling_kwargs(pipe, method, steps, prompts)
    guide_counter = UNetCallCounter(method.guide) if method.guide is not None else None

    def compare(batch_negative: Conditioning):
        def hook(t, model_input, output, prompt_embeds, added_cond_kwargs=None):
            with counter.paused():  # the teacher calls made for the comparison are not the method's cost
                guided = guided_at(t, guidance_interval)  # outside the interval the teacher is the conditional model, too
                teacher = pipe.mode_noise_pred("cfg" if guided else "none", model_input, t, prompt_embeds, guidance_scale=teacher_scale or w,
                                               added_cond_kwargs=added_cond_kwargs, **negative_inputs(batch_negative, len(prompt_embeds), added_cond_kwargs))
            errors.append(float((output.float() - teacher.float()).pow(2).mean()))
        return hook

    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=f"{method.name} {steps} steps w={w}", leave=False):
            batch = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(batch))]
            batch_negative = batch_rows(negative, start, start + len(batch)) if negative is not None else None
            hook = None
            if start < FIDELITY_SUBSET and method.mode == "cfg" and trajectory is not None:
                hook = functools.partial(trajectory.record, negative=batch_negative if method.negative_prompt else None)
            elif start < FIDELITY_SUBSET and method.mode != "cfg" and batch_negative is not None:
                hook = compare(batch_negative)
            own_negative = pipeline_kwargs(batch_negative) if method.negative_prompt and batch_negative is not None else {}
            output = pipe(batch, guidance_scale=1.0 if method.mode == "none" else w, num_inference_steps=steps,
                          generator=generators, on_model_output=hook, guidance_interval=guidance_interval, **sampling, **own_negative)
            images += output.images
    finally:
        counter.close()
        if guide_counter is not None:
            guide_counter.close()
    mse = float(np.mean(errors)) if errors else (0.0 if method.mode == "cfg" and negative is not None else None)
    return images, mse, (counter.images, guide_counter.images if guide_counter is not None else 0)


def sampling_kwargs(pipe, method: Method, steps: int, prompts: list[str]) -> dict:
    """The pipeline arguments that make `method`: its pipeline mode, and the calibrations it samples with."""
    return dict(mode="cfg" if method.mode == "carry" else method.mode, cfg_first_steps=method.cfg_first_steps,
                first_step_fit=first_step_fit(pipe, steps) if method.first_step_fit else None,
                correction_carry=correction_carry(pipe, steps, method.carry_full_steps, prompts) if method.carry_full_steps else None)


def correction_carry(pipe, steps: int, full_steps: int, prompts: list[str]):
    """The CorrectionCarry of this pipeline's UNet at `steps` steps, fitted once per evaluation on the first prompts."""
    carries = _CARRIES.setdefault(pipe.unet, {})
    if steps not in carries:
        from ..carry import CorrectionCarry

        carries[steps] = CorrectionCarry.fit(pipe, prompts[:CARRY_FIT_PROMPTS], num_inference_steps=steps)
    return dataclasses.replace(carries[steps], full_steps=full_steps)


def first_step_fit(pipe, steps: int):
    """The FirstStepFit of this pipeline's UNet at `steps` steps, made once per evaluation (the rows and the teacher
    replays of a model share it)."""
    fits = _FITS.setdefault(pipe.unet, {})
    if steps not in fits:
        from ..first_step import FirstStepFit

        fits[steps] = FirstStepFit.fit(pipe, num_inference_steps=steps)
    return fits[steps]


_FITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # UNet -> {steps: fit}; gone with the UNet
_CARRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # UNet -> {steps: CorrectionCarry}
