"""The CFG teacher's own sampling trajectory, recorded while it samples, and any method replayed at its states.

A method's images can drift from CFG's because of one early error; comparing model outputs at the states
CFG itself visits says at which steps the method fails to give CFG's output, independently of earlier steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import Conditioning
from ..pipeline import PlugAndPlayPipeline, step_modes
from ..schedules import guided_at


@dataclass
class TeacherState:
    timestep: int
    sample: torch.Tensor  # (B, C, h, w): the scaled model input at this step, on the CPU
    prompt_embeds: torch.Tensor  # (B, tokens, dim), on the CPU
    cfg_output: torch.Tensor  # (B, C, h, w): the teacher's output, on the CPU
    added_cond_kwargs: dict | None = None  # SDXL: text_embeds (B, dim) and time_ids (B, 6), on the CPU
    negative: Conditioning | None = None  # (B rows) the teacher's per-image negative prompts, on the CPU; None: the empty one


class TeacherTrajectory:
    """Pass `record` as PlugAndPlayPipeline's `on_model_output` while sampling with mode="cfg"; then
    `squared_errors` replays a method at every recorded state. Kept on the CPU: 64 images x 50 steps of
    SD1.5 latents (input and output) are ~0.4 GB."""

    def __init__(self, guidance_interval: tuple[float, float] | None = None):
        self.guidance_interval = guidance_interval  # the teacher sampled with w only inside it: replays do the same
        self.states: list[TeacherState] = []
        self._baselines: dict[int, float] | None = None
        self._embeds: tuple | None = None  # (the pipeline's tensor, CPU copies of it, its added_cond_kwargs and negative)

    def record(self, t, model_input: torch.Tensor, output: torch.Tensor, prompt_embeds: torch.Tensor, added_cond_kwargs: dict | None = None,
               negative: Conditioning | None = None) -> None:
        """`negative`: the batch's rows of CFG's unconditional input when the teacher samples with negative prompts
        (bind it with functools.partial: the pipeline passes the first five arguments)."""
        if self._embeds is None or self._embeds[0] is not prompt_embeds:  # one copy per batch, not one per step
            added = None if added_cond_kwargs is None else {k: v.cpu() for k, v in added_cond_kwargs.items()}
            self._embeds = (prompt_embeds, prompt_embeds.cpu(), added, None if negative is None else negative.to("cpu"))
        self.states.append(TeacherState(int(t), model_input.cpu(), self._embeds[1], output.float().cpu(), *self._embeds[2:]))

    @property
    def images(self) -> int:
        """How many images the recorded states belong to (every image has one state per timestep)."""
        return sum(s.sample.shape[0] for s in self.states) // max(len({s.timestep for s in self.states}), 1)

    @torch.no_grad()
    def squared_errors(self, pipe: PlugAndPlayPipeline, mode: str, guidance_scale: float,
                       negative: Conditioning, with_negative: bool = True, cfg_first_steps: int = 0,
                       first_step_fit=None) -> tuple[dict[int, float], dict[int, float]]:
        """timestep -> summed ||output - CFG output||^2 over the recorded images, for `mode` (with `pipe.guide`
        at `guidance_scale`) and for the conditional model (the baseline, computed once with the same call
        that mode "none" makes, so that "none" scores exactly 0). `negative`: one row, the empty prompt's
        unconditional input; the method is given it instead of the teacher's recorded negatives unless `with_negative`
        (a guide replayed as it samples without them; CFG's outputs were always recorded with them). With
        `cfg_first_steps`, the method runs CFG at the first (highest) timesteps, as the pipeline samples it; with
        `first_step_fit` (a FirstStepFit), CFG in one pass at the first timestep."""
        if self._baselines is None:
            self._baselines = self._errors(pipe, "none", 1.0, negative, with_negative)
        return self._errors(pipe, mode, guidance_scale, negative, with_negative, cfg_first_steps, first_step_fit), self._baselines

    def _errors(self, pipe, mode: str, guidance_scale: float, empty: Conditioning, with_negative: bool,
                cfg_first_steps: int = 0, first_step_fit=None) -> dict[int, float]:
        errors: dict[int, float] = {}
        timesteps = sorted({s.timestep for s in self.states}, reverse=True)  # sampling order
        uses_negative = with_negative and any(s.negative is not None for s in self.states)
        interval = pipe.sampling_interval(self.guidance_interval, mode, uses_negative)  # as the method sampled: a guide's default interval
        schedule = [guidance_scale if guided_at(t, interval) else 1.0 for t in timesteps]
        modes = dict(zip(timesteps, step_modes(mode, timesteps, schedule, cfg_first_steps, first_step_fit is not None)))  # as the pipeline samples
        for state in self.states:
            negative = state.negative if with_negative and state.negative is not None else empty
            embeds = state.prompt_embeds.to(pipe.device)
            added = None if state.added_cond_kwargs is None else {k: v.to(pipe.device) for k, v in state.added_cond_kwargs.items()}
            if modes[state.timestep] == "fit":
                output = pipe.fitted_cfg_noise_pred(first_step_fit, state.sample.to(pipe.device), state.timestep, guidance_scale, embeds, added)
            else:
                output = pipe.mode_noise_pred(modes[state.timestep], state.sample.to(pipe.device), state.timestep, embeds, guidance_scale=guidance_scale,
                                              added_cond_kwargs=added, **negative_inputs(negative.to(pipe.device), len(embeds), added))
            error = float((output.float().cpu() - state.cfg_output).pow(2).sum())
            errors[state.timestep] = errors.get(state.timestep, 0.0) + error
        return errors


def negative_inputs(negative: Conditioning, batch: int, added_cond_kwargs: dict | None) -> dict:
    """mode_noise_pred's negative_* arguments for `batch` rows from a one-row or `batch`-row negative; SDXL's negative time ids
    are the prompt's own (size and crop), as StableDiffusionXLPipeline builds them."""
    negative = negative.expand(batch)
    if added_cond_kwargs is None:
        return {"negative_prompt_embeds": negative.prompt_embeds, "negative_added_cond_kwargs": None}
    added = {"text_embeds": negative.text_embeds, "time_ids": added_cond_kwargs["time_ids"]}
    return {"negative_prompt_embeds": negative.prompt_embeds, "negative_added_cond_kwargs": added}
