"""Where an output guide's per-step error comes from: the states it was trained on, fresh teacher states on training
captions, or fresh states on held-out captions (attribute combinations the base never saw in training).
Per step k, the share of the step's gap closed, 1 - sum |guide - cfg|^2 / sum |cond - cfg|^2, each row's error in
units of cond - uncond (divided by (w - 1)^2), w ~ U[2, 9] as in training.
Usage: python train_vs_heldout.py GUIDE RUN_TRAJECTORIES OUT.json [runs_per_set] [threads] [the run's --seed, default 0]"""
import json, sys, tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler

from pnpguide.conditioning import encode_prompts
from pnpguide.embedded import shapes
from pnpguide.loading import load_guide, load_pipeline
from pnpguide.shards import ShardPool
from pnpguide.sources import shapes_captions, teacher_trajectories
from pnpguide.teacher import cfg_combine, output_guided

guide_path, trajectories, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 320
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
STEPS = 5
pipe, guide = load_pipeline(None), load_guide(guide_path).eval()
resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
scheduler.set_timesteps(25)
timesteps = scheduler.timesteps[:STEPS].tolist()


def fresh_pool(prompts: list[str], seed: int) -> ShardPool:
    config = SimpleNamespace(trajectories=runs, seed=seed, trajectory_steps=25, w_min=2.0, w_max=9.0, resolution=None)
    folder = Path(tempfile.mkdtemp()) / "trajectories"
    return teacher_trajectories(pipe, prompts, folder, config, Accelerator(cpu=True), "states", STEPS)


@torch.no_grad()
def per_step_closed(pool, count: int) -> list[float]:
    error, gap = torch.zeros(STEPS), torch.zeros(STEPS)
    for start in range(0, count, 64):
        rows = pool.rows(torch.arange(start, min(start + 64, count)))
        cfg = cfg_combine(rows.unconditional, rows.conditional, rows.guidance)
        embeds = encode_prompts(pipe, rows.prompts, "cpu", resolution).prompt_embeds
        guided = output_guided(guide, rows.conditional, rows.latents, rows.timesteps, embeds, rows.guidance)
        unit = (rows.guidance - 1).pow(2)
        step = torch.tensor([timesteps.index(t) for t in rows.timesteps.tolist()])
        error.index_add_(0, step, (guided - cfg).pow(2).flatten(1).sum(1) / unit)
        gap.index_add_(0, step, (rows.conditional - cfg).pow(2).flatten(1).sum(1) / unit)
    return [round(1 - e.item() / g.item(), 3) for e, g in zip(error, gap)]


run_seed = int(sys.argv[6]) if len(sys.argv) > 6 else 0
train_prompts = shapes_captions(20000, run_seed + 7)  # the captions `distill` trains on (its default --num-samples; seed + 7)
stored = ShardPool(trajectories, train_prompts)
results = {
    "trained-on states": per_step_closed(stored, runs * STEPS),  # whole shards (64 runs each)
    "fresh states, training captions": per_step_closed(fresh_pool(train_prompts, seed=101), runs * STEPS),
    "fresh states, held-out captions": per_step_closed(fresh_pool(shapes.split_captions(runs, "heldout"), seed=102), runs * STEPS),
}
for name, closed in results.items():
    print(f"{name:34s}", closed)
Path(out).write_text(json.dumps({"guide": guide_path, "runs_per_set": runs, "per_step_closed": results}, indent=1))
