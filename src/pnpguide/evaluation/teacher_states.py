"""The CFG teacher's own sampling trajectory, recorded while it samples, and any method replayed at its states.

A method's images can drift from CFG's because of one early error; comparing model outputs at the states
CFG itself visits says at which steps the method fails to give CFG's output, independently of earlier steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..conditioning import Conditioning
from ..pipeline import Branches, PlugAndPlayPipeline


@dataclass
class TeacherState:
    timestep: int
    sample: torch.Tensor  # (B, C, h, w): the scaled model input at this step, on the CPU
    cfg_output: torch.Tensor  # (B, C, h, w): the teacher's output, on the CPU
    branches: Branches  # what the UNet read (the prompt's and the teacher's negative), on the CPU
    negative: bool  # the teacher sampled with the evaluation's negative prompts (not the empty one)


class TeacherTrajectory:
    """Observe CFG sampling with `pipe.model_output_observer(trajectory.recorder(...))`; then `squared_errors` replays a
    method at every recorded state. Kept on the CPU: 64 images x 50 steps of SD1.5 latents (input and output) are ~0.4 GB."""

    def __init__(self):
        self.states: list[TeacherState] = []
        self._baselines: dict[int, float] | None = None
        self._copies: tuple | None = None  # (the pipeline's Branches, its CPU copy): one copy per batch, not one per step

    def recorder(self, negative: Conditioning | None = None):
        """An observer for CFG sampling; `negative`: the batch's negative prompts, when the teacher samples with them."""
        def record(step) -> None:
            if self._copies is None or self._copies[0] is not step.branches:
                self._copies = (step.branches, branches_to(step.branches, "cpu"))
            self.states.append(TeacherState(int(step.timestep), step.model_input.cpu(), step.output.float().cpu(), self._copies[1],
                                            negative is not None))
        return record

    @property
    def images(self) -> int:
        """How many images the recorded states belong to (every image has one state per timestep)."""
        return sum(s.sample.shape[0] for s in self.states) // max(len({s.timestep for s in self.states}), 1)

    @torch.no_grad()
    def squared_errors(self, pipe: PlugAndPlayPipeline, mode: str, guidance_scale: float, empty: Conditioning,
                       with_negative: bool = True) -> tuple[dict[int, float], dict[int, float]]:
        """timestep -> summed ||output - CFG output||^2 over the recorded images, for `mode` (with `pipe.guide` and its own
        policy's interval, at `guidance_scale`) and for the conditional model (the baseline, computed once with the same
        call that mode "none" makes, so that "none" scores exactly 0). `empty`: one row, the empty prompt's
        unconditional input, given to the method instead of the teacher's recorded negatives unless `with_negative`."""
        if self._baselines is None:
            self._baselines = self._errors(pipe, "none", 1.0, empty, with_negative)
        return self._errors(pipe, mode, guidance_scale, empty, with_negative), self._baselines

    def _errors(self, pipe, mode: str, guidance_scale: float, empty: Conditioning, with_negative: bool) -> dict[int, float]:
        errors: dict[int, float] = {}
        negative = with_negative and any(s.negative for s in self.states)
        policy = pipe.call_policy(mode, None, negative) if mode != "none" else None
        for state in self.states:
            branches = branches_to(state.branches, pipe.device)
            if not (with_negative and state.negative):
                branches = teacher_branches(replace(branches, negative_prompt_embeds=None, negative_added=None), empty.to(pipe.device))
            elif mode == "guide":
                branches.negative_rows = torch.ones(len(branches.prompt_embeds), dtype=torch.bool, device=pipe.device)
            kind = "none" if policy is None or not policy.guided_at(state.timestep) else mode
            output, _, _ = pipe.model_output(kind, state.sample.to(pipe.device), state.timestep, branches, guidance_scale)
            errors[state.timestep] = errors.get(state.timestep, 0.0) + float((output.float().cpu() - state.cfg_output).pow(2).sum())
        return errors


def teacher_branches(branches: Branches, negative: Conditioning) -> Branches:
    """The branches with CFG's unconditional input from `negative` (one row, or one per row) where they have none; SDXL's
    negative time ids are the prompt's own (size and crop), as StableDiffusionXLPipeline builds them."""
    if branches.negative_prompt_embeds is not None:
        return branches
    negative = negative.rows_for(len(branches.prompt_embeds)).to(branches.prompt_embeds.device, branches.prompt_embeds.dtype)
    added = None if branches.added is None else {"text_embeds": negative.text_embeds, "time_ids": branches.added["time_ids"]}
    return replace(branches, negative_prompt_embeds=negative.prompt_embeds, negative_added=added)


def branches_to(branches: Branches, device) -> Branches:
    move = lambda value: None if value is None else [v.to(device) for v in value] if isinstance(value, list) else value.to(device)  # noqa: E731
    moved = {k: None if v is None else ({key: move(x) for key, x in v.items()} if isinstance(v, dict) else move(v))
             for k, v in vars(branches).items()}
    return Branches(**moved)
