"""Where a first-steps guide loses the image gap to CFG: per step, and per w.

Two tables for a guide that runs its first K steps and then carries its correction (the `default` guide):
- its fit at each guided step, 1 - |d_guide - d_cfg|^2 / |d_cfg|^2 with d = cond - uncond, at the states of its own
  sampling and at the states of CFG's sampling (the states it was trained on);
- the image gap closed when CFG's exact correction replaces the guide's at some guided steps (an oracle: each replaced
  step costs CFG's second pass), which says how much of the gap each step's error costs in the image.

Images, CFG and no guidance are sampled as in `image_gap.py` (held-out captions, same seeds, diffusers' own CFG).

    python benchmarks/guide_errors.py --guide default --prompts 48 --scales 3 7.5 --exact 4 3,4 0-3 0-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from pnpguide import GuideModel, PlugAndPlayPipeline
from pnpguide.embedded import shapes
from pnpguide.loading import default_base_dir
from pnpguide.quiet import quiet_component_types

sys.path.insert(0, str(Path(__file__).resolve().parent))  # image_gap.py, beside this script: the same sampling and measure
from image_gap import gap_closed, sample  # noqa: E402


class ProbedPipeline(PlugAndPlayPipeline):
    """The pipeline with two probes at the guide's steps: `exact_steps` (step indices) take CFG's own correction instead
    of the guide's, and while `fit` is a dict, each guided step adds its squared error and CFG's squared correction."""

    exact_steps: frozenset = frozenset()
    fit: dict | None = None

    def model_output(self, kind, sample, t, branches, guidance_scale, timestep_cond=None):
        if kind not in ("guide", "cfg"):
            return super().model_output(kind, sample, t, branches, guidance_scale, timestep_cond)
        step = self.scheduler.timesteps.tolist().index(int(t))
        if step >= self.guide.policy.carry.full_steps:
            return super().model_output(kind, sample, t, branches, guidance_scale, timestep_cond)
        use_exact = kind == "cfg" or step in self.exact_steps
        exact = guided = None  # each pass only where it is returned or measured
        if use_exact or self.fit is not None:
            unconditional = dataclasses.replace(branches, negative_prompt_embeds=self.empty_embeds.expand(len(sample), -1, -1))
            exact = super().model_output("cfg", sample, t, unconditional, guidance_scale, timestep_cond)
        if not use_exact or self.fit is not None:
            guided = super().model_output("guide", sample, t, branches, guidance_scale, timestep_cond)
        if self.fit is not None:
            error, size = self.fit.get(step, (0.0, 0.0))
            self.fit[step] = (error + (guided[2] - exact[2]).pow(2).sum().item(), size + exact[2].pow(2).sum().item())
        return exact if use_exact else guided


def step_set(spec: str) -> frozenset:
    """"4", "3,4" or "0-3" -> step indices."""
    steps = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return frozenset(steps)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guide", default="default", help="a shipped first-steps guide's name or folder (default: default)")
    parser.add_argument("--prompts", type=int, default=48, help="held-out captions, half with one object and half with two (default: 48)")
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 7.5], help="guidance scales w (default: 3 7.5)")
    parser.add_argument("--exact", nargs="*", default=["4", "0-3", "0-4"],
                        help="guided steps that take CFG's correction, one image-gap row each: 4, 3,4 or 0-3 (default: 4 0-3 0-4)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    prompts = shapes.evaluation_captions(args.prompts)
    with quiet_component_types():
        diffusers_pipe = StableDiffusionPipeline.from_pretrained(default_base_dir())
    diffusers_pipe.set_progress_bar_config(disable=True)
    guide = GuideModel.from_pretrained(args.guide)
    if guide.policy.carry is None:
        raise SystemExit(f"{args.guide} is not a first-steps guide (its folder has no carry): guide_errors.py probes the steps it runs before carrying")
    pipe = ProbedPipeline.from_pipe(diffusers_pipe, guide=guide)
    pipe.set_progress_bar_config(disable=True)
    pipe.empty_embeds = pipe.encode_prompt([""], pipe.device, 1, False)[0]
    steps = guide.policy.num_inference_steps or 25
    results = {"guide": args.guide, "prompts": len(prompts), "fit": {}, "image_gap_closed": {}}

    print("| states | w | " + " | ".join(f"fit at step {k}" for k in range(guide.policy.carry.full_steps)) + " |")
    print("|---|---|" + "---|" * guide.policy.carry.full_steps)
    for mode, states in (("guide", "its own"), ("cfg", "CFG's")):
        for w in args.scales:
            pipe.fit = {}
            sample(pipe, prompts, w, steps, args.batch_size, args.seed, mode=mode)
            fit = [1 - error / size for _, (error, size) in sorted(pipe.fit.items())]
            results["fit"][f"{states} states, w = {w:g}"] = fit
            print(f"| {states} | {w:g} | " + " | ".join(f"{value:.3f}" for value in fit) + " |", flush=True)
    pipe.fit = None

    print("\n| CFG's correction at steps | " + " | ".join(f"image gap closed, w = {w:g}" for w in args.scales) + " |")
    print("|---|" + "---|" * len(args.scales))
    references = {w: (sample(diffusers_pipe, prompts, w, steps, args.batch_size, args.seed),
                      sample(diffusers_pipe, prompts, 1.0, steps, args.batch_size, args.seed)) for w in args.scales}
    for spec in ["none", *args.exact]:
        pipe.exact_steps = frozenset() if spec == "none" else step_set(spec)
        gaps = {w: gap_closed(sample(pipe, prompts, w, steps, args.batch_size, args.seed), *references[w]) for w in args.scales}
        results["image_gap_closed"][spec] = gaps
        print(f"| {spec} | " + " | ".join(f"{gaps[w]:.3f}" for w in args.scales) + " |", flush=True)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)
    return results


if __name__ == "__main__":
    main()
