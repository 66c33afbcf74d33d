"""The methods `pnpguide eval` compares and how each samples its images, measured against the CFG teacher as it goes.

A method is a pipeline mode and a policy, sampled through the public call exactly as a user would: `none` (w = 1),
`cfg` (diffusers' CFG), the training-free policies in CFG mode (its correction carried after K steps: `cfg + carry K`;
Adaptive Guidance with threshold T: `cfg + AG T`, and with the carry after it: `cfg + AG T + carry`), and each guide
with its own policy (`guide:NAME`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..carry import CorrectionCarry
from ..conditioning import Conditioning
from ..pipeline import PlugAndPlayPipeline
from ..policy import GuidancePolicy
from .negative_prompts import batch_rows, pipeline_kwargs
from .speed import UNetCallCounter
from .teacher_states import TeacherTrajectory, teacher_branches

FIDELITY_SUBSET = 64  # images whose per-step model outputs are compared with the teacher's (one extra model call per step and row)
NO_NEGATIVE = " (no neg)"  # suffix of a guide's row sampled without the negative prompts, beside its row with them
CARRY = "cfg + carry {}"  # CFG in full for {} steps, then its correction carried (--correction-carry)
ADAPTIVE = "cfg + AG {:g}"  # Adaptive Guidance at threshold {} (--adaptive-thresholds)
ADAPTIVE_CARRY = ADAPTIVE + " + carry"  # Adaptive Guidance, its correction carried after each image's CFG steps
CARRY_FIT_PROMPTS = 16  # prompts CorrectionCarry.fit samples CFG on, once per evaluation, model and step count


@dataclass(frozen=True)
class Method:
    name: str  # "none", "cfg", "cfg + carry K", "cfg + AG T", "guide:<name>" or (negative prompts) "guide:<name> (no neg)"
    mode: str  # the pipeline's mode: "none", "cfg" or "guide"
    guide: object | None = None  # a GuideModel
    step_counts: tuple[int, ...] | None = None  # a step-distilled guide: only its grid's step count
    negative_prompt: bool = False  # samples with the evaluation's negative prompts (--negative-prompts)
    carry_full_steps: int = 0  # cfg: CFG for these first steps, then its correction carried (0: none)
    adaptive_threshold: float | None = None  # cfg: Adaptive Guidance's cosine threshold
    adaptive_carry: bool = False  # with adaptive_threshold: the correction carried after each image's CFG steps

    def runs_at(self, steps: int) -> bool:
        return self.step_counts is None or steps in self.step_counts

    @property
    def carried(self) -> bool:
        """Whether a step depends on the steps before (a carried correction), so it cannot be replayed at the teacher's states."""
        own = self.guide.policy if self.guide is not None else None
        return bool(self.carry_full_steps or self.adaptive_threshold is not None or (own is not None and own.carry is not None))

    def policy(self, pipe, steps: int, prompts: list[str]) -> GuidancePolicy | None:
        """The policy this method passes to the pipeline (None: the pipeline's default, a guide's own or plain CFG)."""
        if self.mode != "cfg" or not (self.carry_full_steps or self.adaptive_threshold is not None):
            return None
        carry = fitted_carry(pipe, steps, prompts) if self.carry_full_steps or self.adaptive_carry else None
        if carry is not None and self.carry_full_steps:
            carry = carry.with_full_steps(self.carry_full_steps)
        return GuidancePolicy(carry=carry, adaptive_threshold=self.adaptive_threshold)


@torch.no_grad()
def sample(pipe: PlugAndPlayPipeline, method: Method, prompts: list[str], steps: int, w: float, seed: int, batch_size: int,
           negative: Conditioning | None = None, teacher_scale: float | None = None, trajectory: TeacherTrajectory | None = None,
           ) -> tuple[list[Image.Image], float | None, tuple[int, int]]:
    """Images i from the generator seeded `seed * 1_000_003 + i`; with `negative` (CFG's unconditional input: one
    row, :func:`pnpguide.conditioning.encode_negative`, or one per prompt with negative prompts), also the mean per-step
    squared error between the method's model output and the CFG teacher's (at `teacher_scale`, default w) on the
    method's own trajectory, for the first FIDELITY_SUBSET images. The cfg method instead records its states
    for those images into `trajectory`, if given. A method with `negative_prompt` samples with its rows of `negative`.
    Also returns the images the UNet and the guide processed, teacher calls for the comparison left out."""
    pipe.guide = method.guide
    counter, errors, images = UNetCallCounter(pipe.unet), [], []
    with counter.paused():  # one-off calibrations, not a cost per image
        policy = method.policy(pipe, steps, prompts)
    guide_counter = UNetCallCounter(method.guide) if method.guide is not None else None

    def compare(batch_negative: Conditioning):
        def observe(step):
            with counter.paused():  # the teacher calls made for the comparison are not the method's cost
                branches = teacher_branches(step.branches, batch_negative)
                teacher, _, _ = pipe.model_output("cfg", step.model_input, step.timestep, branches, teacher_scale or w)
            errors.append(float((step.output.float() - teacher.float()).pow(2).mean()))
        return observe

    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=f"{method.name} {steps} steps w={w}", leave=False):
            batch = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(batch))]
            batch_negative = batch_rows(negative, start, start + len(batch)) if negative is not None else None
            observer = None
            if start < FIDELITY_SUBSET and method.mode == "cfg" and policy is None and trajectory is not None:
                observer = trajectory.recorder(batch_negative if method.negative_prompt else None)
            elif start < FIDELITY_SUBSET and method.mode != "cfg" and batch_negative is not None:
                observer = compare(batch_negative)
            own_negative = pipeline_kwargs(batch_negative) if method.negative_prompt and batch_negative is not None else {}
            with pipe.model_output_observer(observer):
                output = pipe(batch, guidance_scale=1.0 if method.mode == "none" else w, num_inference_steps=steps,
                              generator=generators, mode=method.mode, policy=policy, **own_negative)
            images += output.images
    finally:
        counter.close()
        if guide_counter is not None:
            guide_counter.close()
    mse = float(np.mean(errors)) if errors else (0.0 if method.mode == "cfg" and policy is None and negative is not None else None)
    return images, mse, (counter.images, guide_counter.images if guide_counter is not None else 0)


def fitted_carry(pipe, steps: int, prompts: list[str]) -> CorrectionCarry:
    """The CorrectionCarry of this pipeline's UNet at `steps` steps, fitted once per evaluation on the first prompts."""
    carries = _CARRIES.setdefault(pipe.unet, {})
    if steps not in carries:
        carries[steps] = CorrectionCarry.fit(pipe, prompts[:CARRY_FIT_PROMPTS], num_inference_steps=steps)
    return carries[steps]


_CARRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # UNet -> {steps: CorrectionCarry}; gone with the UNet
