"""Where do the stage-2 students lose FID and adherence: at the late steps, where their per-step gap turns negative?

The students (`output-16step`, `output-8step`) sampled with the guide only at t >= T_LOW (w = 1, one plain UNet
pass, below), against 50-step CFG at constant w, the same 300 held-out captions and seeds as `pnpguide eval`:
FID, adherence and the image gap vs 50-step CFG.
Usage: python interval.py OUT.json [IMAGES] [W] [THREADS] [SEED] [T_LOWS, e.g. 700,500,300] [CFG_STEPS, e.g. 16,8]
"""

import json
import sys

import torch

from pnpguide.evaluation.evaluate import EvalConfig, _adherence_split, eval_prompts
from pnpguide.evaluation.fid import make_fid_scorer
from pnpguide.evaluation.gap import gap_closed, image_mse
from pnpguide.evaluation.methods import Method, sample
from pnpguide.evaluation.sampling import as_plug_and_play
from pnpguide.loading import load_guide, load_pipeline

out, images = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300
w = float(sys.argv[3]) if len(sys.argv) > 3 else 7.5
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
lows = [int(t) for t in sys.argv[6].split(",")] if len(sys.argv) > 6 else [700, 500, 300]
cfg_steps = [int(n) for n in sys.argv[7].split(",") if n] if len(sys.argv) > 7 else [16, 8]
prompts = eval_prompts(EvalConfig(images=images))
pipe = as_plug_and_play(load_pipeline())
pipe.set_progress_bar_config(disable=True)
scorer = make_fid_scorer("shapes")
scorer.set_reference("flat", len(prompts), image_size=64)

# (name, method, steps, guidance interval): (0, 1000) guides every step (the shipped students default to (500, 1000))
SETTINGS = [("cfg", Method("cfg", "cfg"), 50, None), ("none", Method("none", "none"), 50, None)]
for name in ("output-16step", "output-8step"):
    guide = load_guide(name).eval()
    steps = guide.config.trained_step_counts[0]
    SETTINGS += [(name, Method(name, "guide", guide), steps, interval) for interval in [(0, 1000)] + [(t, 1000) for t in lows]]
SETTINGS += [("cfg", Method("cfg", "cfg"), steps, interval) for steps in cfg_steps for interval in (None, (500, 1000))]

results, reference = [], {}
for name, method, steps, interval in SETTINGS:
    sampled, _, _ = sample(pipe, method, prompts, steps, w, seed=seed, batch_size=64, guidance_interval=interval)
    if steps == 50:
        reference[name] = sampled
    adherence = _adherence_split(sampled, prompts, "flat")
    row = {"method": name, "steps": steps, "interval": interval, "fid": scorer.score(sampled), "adherence": adherence[0],
           "adherence_1_2": adherence[1:],
           "image_gap_vs_cfg50": gap_closed(image_mse(sampled, reference["cfg"]), image_mse(reference["none"], reference["cfg"])) if len(reference) == 2 else None}
    results.append(row)
    print(json.dumps(row), flush=True)
json.dump({"w": w, "images": images, "seed": seed, "rows": results}, open(out, "w"), indent=1)
