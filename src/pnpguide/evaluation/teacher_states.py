"""The CFG teacher's own sampling trajectory, recorded while it samples, and any method replayed at its states.

A method's images can drift from CFG's because of one early error; comparing model outputs at the states
CFG itself visits says at which steps the method fails to give CFG's output, independently of earlier steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pipeline import PlugAndPlayPipeline


@dataclass
class TeacherState:
    timestep: int
    sample: torch.Tensor  # (B, C, h, w): the scaled model input at this step, on the CPU
    prompt_embeds: torch.Tensor  # (B, tokens, dim), on the CPU
    cfg_output: torch.Tensor  # (B, C, h, w): the teacher's output, on the CPU


class TeacherTrajectory:
    """Pass `record` as PlugAndPlayPipeline's `on_model_output` while sampling with mode="cfg"; then
    `squared_errors` replays a method at every recorded state. Kept on the CPU: 64 images x 50 steps of
    SD1.5 latents (input and output) are ~0.4 GB."""

    def __init__(self):
        self.states: list[TeacherState] = []
        self._baselines: dict[int, float] | None = None
        self._embeds: tuple[torch.Tensor, torch.Tensor] | None = None  # (the pipeline's tensor, its CPU copy)

    def record(self, t, model_input: torch.Tensor, output: torch.Tensor, prompt_embeds: torch.Tensor) -> None:
        if self._embeds is None or self._embeds[0] is not prompt_embeds:  # one copy per batch, not one per step
            self._embeds = (prompt_embeds, prompt_embeds.cpu())
        self.states.append(TeacherState(int(t), model_input.cpu(), self._embeds[1], output.float().cpu()))

    @property
    def images(self) -> int:
        """How many images the recorded states belong to (every image has one state per timestep)."""
        return sum(s.sample.shape[0] for s in self.states) // max(len({s.timestep for s in self.states}), 1)

    @torch.no_grad()
    def squared_errors(self, pipe: PlugAndPlayPipeline, mode: str, guidance_scale: float,
                       negative_embeds: torch.Tensor) -> tuple[dict[int, float], dict[int, float]]:
        """timestep -> summed ||output - CFG output||^2 over the recorded images, for `mode` (with `pipe.guide`
        at `guidance_scale`) and for the conditional model (the baseline, computed once with the same call
        that mode "none" makes, so that "none" scores exactly 0)."""
        if self._baselines is None:
            self._baselines = self._errors(pipe, "none", 1.0, negative_embeds)
        return self._errors(pipe, mode, guidance_scale, negative_embeds), self._baselines

    def _errors(self, pipe, mode: str, guidance_scale: float, negative_embeds: torch.Tensor) -> dict[int, float]:
        errors: dict[int, float] = {}
        for state in self.states:
            embeds = state.prompt_embeds.to(pipe.device)
            output = pipe.mode_noise_pred(mode, state.sample.to(pipe.device), state.timestep, embeds,
                                          negative_embeds.expand_as(embeds), guidance_scale)
            error = float((output.float().cpu() - state.cfg_output).pow(2).sum())
            errors[state.timestep] = errors.get(state.timestep, 0.0) + error
        return errors
