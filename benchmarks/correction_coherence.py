"""How CFG's correction changes from one sampling step to the next: why a correction carry works, and after how many steps.

CFG's output at step k is `cond + (w - 1) * d_k`, with d_k = cond_k - uncond_k. Along CFG's own trajectories (the
pipeline in mode "cfg", the base's scheduler, held-out prompts), this prints per step:
- cosine(d_k, d_{k-1}), the mean over prompts;
- the share of d_k that one fitted factor per step reproduces from the step before, a_k d_{k-1}, on the odd-numbered
  prompts with a_k fitted by least squares on the even-numbered ones (open loop: the true d_{k-1} is given). This is
  what `pnpguide.CorrectionCarry` does after its first steps, one step at a time;
- each step's share of the whole correction's energy, sum over prompts of |d_k|^2 over the sum over all steps.

    python benchmarks/correction_coherence.py                                  # embedded base, 96 prompts, w = 7.5, 25 steps
    python benchmarks/correction_coherence.py --lora src/pnpguide/assets/finetunes/outline-lora --out lora.json
    python benchmarks/correction_coherence.py --prompts 4 --steps 4            # smoke run (seconds)

Any SD 1.x/2.x or SDXL folder with --base DIR --prompt-file FILE.
"""

from __future__ import annotations

import argparse
import json

import torch

from pnpguide import PlugAndPlayPipeline, PlugAndPlayXLPipeline
from pnpguide.embedded import shapes
from pnpguide.loading import load_pipeline




@torch.no_grad()
def corrections(pipe, prompts: list[str], w: float, steps: int, batch_size: int, seed: int) -> tuple[torch.Tensor, list[float]]:
    """(steps, prompts, ...) the correction d_k = cond_k - uncond_k at every model call of CFG sampling, and the timesteps."""
    per_batch, timesteps = [], []
    for start in range(0, len(prompts), batch_size):
        batch, calls = prompts[start : start + batch_size], []

        def record(step):
            calls.append(((step.output - step.conditional) / (w - 1)).float().cpu())
            if start == 0:
                timesteps.append(float(step.timestep))

        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        with pipe.model_output_observer(record):
            pipe(batch, guidance_scale=w, num_inference_steps=steps, generator=generators, mode="cfg", output_type="latent")
        per_batch.append(torch.stack(calls))
    return torch.cat(per_batch, dim=1), timesteps


def table(d: torch.Tensor, timesteps: list[float]) -> list[dict]:
    fit, test = torch.arange(d.shape[1]) % 2 == 0, torch.arange(d.shape[1]) % 2 == 1
    energy = d.pow(2).flatten(2).sum(2).sum(1)
    rows = [{"step": 0, "t": timesteps[0], "cosine with the step before": None, "reproduced by a_k d_(k-1)": None, "a_k": None,
             "share of the energy": (energy[0] / energy.sum()).item()}]
    for k in range(1, len(d)):
        now, before = d[k].flatten(1), d[k - 1].flatten(1)
        a = (now[fit] * before[fit]).sum() / before[fit].pow(2).sum()
        reproduced = 1 - (now[test] - a * before[test]).pow(2).sum() / now[test].pow(2).sum()
        rows.append({"step": k, "t": timesteps[k], "cosine with the step before": torch.nn.functional.cosine_similarity(now, before).mean().item(),
                     "reproduced by a_k d_(k-1)": reproduced.item(), "a_k": a.item(), "share of the energy": (energy[k] / energy.sum()).item()})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="SD or SDXL folder (default: the embedded base)")
    parser.add_argument("--lora", default=None, help="LoRA weights to load into the base")
    parser.add_argument("--prompt-file", default=None, help="one prompt per line (needed with --base)")
    parser.add_argument("--prompts", type=int, default=96, help="prompts, half fitting the factors, half testing them (default: 96)")
    parser.add_argument("--w", type=float, default=7.5, help="guidance scale (default: 7.5)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.base and not args.prompt_file:
        parser.error("--base needs --prompt-file (the held-out captions are the embedded base's)")
    if args.prompts < 2 or args.w == 1:
        parser.error("need --prompts >= 2 (half fit the factors, half test them) and --w != 1 (w = 1 has no correction)")
    if args.prompt_file:
        lines = [line.strip() for line in open(args.prompt_file, encoding="utf-8") if line.strip()]
        prompts = [lines[i % len(lines)] for i in range(args.prompts)]
    else:
        prompts = shapes.evaluation_captions(args.prompts)
    sd = load_pipeline(args.base, args.lora)
    pipe = (PlugAndPlayXLPipeline if "XL" in type(sd).__name__ else PlugAndPlayPipeline).from_pipe(sd)
    pipe.set_progress_bar_config(disable=True)
    d, timesteps = corrections(pipe, prompts, args.w, args.steps, args.batch_size, args.seed)
    rows = table(d, timesteps)
    print(f"| step | t | cosine(d_k, d_(k-1)) | reproduced by a_k d_(k-1) | a_k | share of the energy |  ({len(prompts)} prompts, w = {args.w:g})")
    print("|---|---|---|---|---|---|")
    show = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for row in rows:
        print(f"| {row['step']} | {row['t']:g} | {show(row['cosine with the step before'])} | {show(row['reproduced by a_k d_(k-1)'])} | "
              f"{show(row['a_k'])} | {show(row['share of the energy'])} |")
    result = {"base": args.base, "lora": args.lora, "prompts": len(prompts), "w": args.w, "steps": args.steps, "rows": rows}
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
