"""Where a grid student's error is, segment by segment, at the teacher's own states (teacher-forced).

Held-out CFG teacher runs (the held-out captions of `pnpguide eval`, fixed w, other noise than training) are cut at the
grid's timesteps (`distill_steps.grid_segments`). For each segment t_i -> t_{i+1} and each method, one DDIM step from the
run's state at t_i; the share of the plain UNet's error it removes at t_{i+1}:
    gap closed = 1 - sum |method - teacher|^2 / sum |plain UNet step - teacher|^2
Methods: each guide (one step of UNet + guide, as it samples), and one CFG step (two UNet passes) for scale. A guide with
a negative head reads the runs' negatives (--negative-rate > 0: that share of runs samples CFG with a negative).

Usage: python benchmarks/few_step_segments.py --grid 999 939 879 819 759 639 499 259 --guides g8=DIR init=output-16step \
           --w 7.5 --runs-dir /tmp/heldout-runs --count 128 --out OUT.json [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", type=int, nargs="+", default=None, help="timesteps (default: the first guide's trained_timesteps)")
    p.add_argument("--guides", nargs="+", required=True, metavar="NAME=GUIDE")
    p.add_argument("--w", type=float, default=7.5)
    p.add_argument("--count", type=int, default=128, help="held-out teacher runs")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--negative-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=99, help="the runs' draws (training used 0)")
    p.add_argument("--runs-dir", required=True, help="where the held-out runs are written (reused when they exist with these settings)")
    p.add_argument("--training-runs", default=None, help="instead: a training teacher-runs folder (shapes captions of --num-samples scenes, "
                   "negatives at 0.5), its runs without a negative and with |w - W| <= --w-band: the states the student was fitted on")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--w-band", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="4 runs at 10 teacher steps: checks the script runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.count, args.teacher_steps = 4, 10
    torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler

    from pnpguide.conditioning import encode_negative, encode_negatives, encode_prompts
    from pnpguide.distill_guidance import freeze
    from pnpguide.distill_steps import StepDistillConfig, _alpha_sigma, ddim_step, grid_segments, predicted_x0
    from pnpguide.evaluation.evaluate import EvalConfig, eval_prompts
    from pnpguide.loading import load_guide, load_pipeline
    from pnpguide.negatives import NegativeSampler
    from pnpguide.sources import teacher_trajectories
    from pnpguide.teacher import cfg_combine, output_guided
    from pnpguide.training import make_accelerator

    guides = {name: load_guide(spec).eval() for name, spec in (g.split("=", 1) for g in args.guides)}
    pipe = load_pipeline(None)
    freeze(pipe)
    teacher = DDIMScheduler.from_config(pipe.scheduler.config)
    teacher.set_timesteps(args.teacher_steps)
    if args.smoke:
        args.grid = [t for t in teacher.timesteps.tolist() if t in (999, 899, 699, 499)]
    grid = args.grid or [int(t) for t in next(iter(guides.values())).config.trained_timesteps]
    config = StepDistillConfig(output_dir=args.runs_dir, trajectories=args.count, trajectory_steps=args.teacher_steps, seed=args.seed,
                               w_min=args.w, w_max=args.w, negative_rate=args.negative_rate)
    if args.training_runs:
        from pnpguide.shards import ShardPool
        from pnpguide.sources import shapes_captions

        prompts = shapes_captions(args.num_samples, 7)
        pool = ShardPool(args.training_runs, prompts, NegativeSampler(0.5).table(prompts))
    else:
        prompts = sorted(set(eval_prompts(EvalConfig(images=300))))
        negatives = NegativeSampler(args.negative_rate) if args.negative_rate > 0 else None
        pool = teacher_trajectories(pipe, prompts, Path(args.runs_dir), config, make_accelerator(config), "states", None, negatives)
    segments = grid_segments(pool, teacher, grid)
    if args.training_runs:  # keep the runs without a negative near W
        keep = torch.tensor([not n and abs(float(w) - args.w) <= args.w_band for n, w in zip(segments.negatives, segments.w)])
        segments = dataclasses.replace(segments, starts=segments.starts[:, keep], conditional=segments.conditional[:, keep],
                                       unconditional=segments.unconditional[:, keep], ends=segments.ends[:, keep], w=segments.w[keep],
                                       prompts=[p for p, k in zip(segments.prompts, keep.tolist()) if k],
                                       negatives=[n for n, k in zip(segments.negatives, keep.tolist()) if k])
    acp, final = teacher.alphas_cumprod.float(), float(teacher.final_alpha_cumprod)
    kind = teacher.config.prediction_type
    embeds = encode_prompts(pipe, segments.prompts, "cpu", 64).prompt_embeds
    empty = encode_negative(pipe, "cpu", 64)
    drawn = segments.negatives or [""] * len(segments.prompts)
    negative = encode_negatives(pipe, drawn, empty, "cpu", 64).prompt_embeds
    rows = torch.tensor([bool(n) for n in drawn])
    w = segments.w
    result = {"grid": grid, "w": args.w, "runs_from": args.training_runs or "held-out", "runs": len(segments.prompts), "runs_with_negative": int(rows.sum()), "teacher_steps": args.teacher_steps,
              "segments": []}
    with torch.no_grad():
        for i, (t, t_next) in enumerate(zip(grid, grid[1:] + [-1])):
            x, cond, uncond, end = segments.starts[i], segments.conditional[i], segments.unconditional[i], segments.ends[i]
            a, s = _alpha_sigma(acp, torch.full((len(x),), t), final)
            a_n, s_n = _alpha_sigma(acp, torch.full((len(x),), t_next), final)

            def step(output):
                return ddim_step(predicted_x0(output, x, a, s, kind), x, a, s, a_n, s_n)

            baseline = float((step(cond) - end).pow(2).sum())
            entry = {"segment": f"{t} -> {t_next}", "plain_error": baseline,
                     "one_cfg_step": 1 - float((step(cfg_combine(uncond, cond, w)) - end).pow(2).sum()) / baseline}
            for name, guide in guides.items():
                head = getattr(guide.config, "negative_head", False)
                output = output_guided(guide, cond, x, torch.full((len(x),), t), embeds, w, negative if head else None, rows if head else None)
                entry[name] = 1 - float((step(output) - end).pow(2).sum()) / baseline
            result["segments"].append(entry)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
