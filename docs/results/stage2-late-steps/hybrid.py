"""Where does `output-8step` lose FID and adherence: in its four guided steps (t >= 500) or in the four coarse
plain-UNet steps below? Hybrid samplers on the same 300 held-out captions and noise as `pnpguide eval` (seed 0), w = 7.5,
against 50-step CFG: each row is a list of (timestep, model) segments, stepped with deterministic DDIM from each
timestep to the next (the last to the end), so the early and late halves can be swapped between grids and models.
  student 4 + plain 4    the shipped output-8step as it samples (guide at 999..624, plain UNet at 499..124)
  student 4 + plain 26   its four guided steps, then the plain UNet on the 50-step grid below t = 500
  cfg 25 + plain 4       50-step CFG above t = 500, then the four coarse plain steps of the 8-step grid
  cfg 25 + plain 26      50-step CFG with guidance only at t >= 500 (the best a t >= 500 interval can do)
  cfg to T + student k + plain 4   50-step CFG down to the student's timestep T, then its last k guided steps
The second set ("first-step") replaces only the student's first step (999 -> 874):
  cfg 1 + student 3 + plain 4        one coarse CFG step (9 UNet calls in all)
  cfg 2 + student 3 + plain 4        two CFG steps of the 16-step grid (11 UNet calls)
  first5 1 + student 3 + plain 4     one step with the stage-1 guide `output-first5`, trained at t = 999 (8 UNet calls)
The third set ("schedule") spends the 8 UNet calls where the error is, with the two shipped students:
  s16 2 + s8 3 + plain 3     output-16step at 999, 937; output-8step at 874, 749, 624; plain UNet at 499, 333, 166
  s16 4 + s8 2 + plain 2     output-16step at 999..811; output-8step at 749, 624; plain UNet at 499, 249
  s16 2 + s8 3 + plain 4     as the first, with the 8-step grid's four plain steps (9 calls)
Usage: python hybrid.py OUT.json [IMAGES] [THREADS] [SET: main | first-step | schedule] [SEED]"""

import json
import sys

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from pnpguide.distill_steps import _alpha_sigma, ddim_step, predicted_x0
from pnpguide.evaluation.evaluate import EvalConfig, _adherence_split, eval_prompts
from pnpguide.evaluation.fid import make_fid_scorer
from pnpguide.evaluation.gap import gap_closed, image_mse
from pnpguide.evaluation.sampling import as_plug_and_play
from pnpguide.loading import load_guide, load_pipeline

out = sys.argv[1]
images = int(sys.argv[2]) if len(sys.argv) > 2 else 300
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
row_set = sys.argv[4] if len(sys.argv) > 4 else "main"
W, BATCH = 7.5, 64
SEED = int(sys.argv[5]) if len(sys.argv) > 5 else 0
prompts = eval_prompts(EvalConfig(images=images))
pipe = as_plug_and_play(load_pipeline())
GUIDES = {"guide": load_guide("output-8step").eval(), "first5": load_guide("output-first5").eval(), "s16": load_guide("output-16step").eval()}
scorer = make_fid_scorer("shapes")
scorer.set_reference("flat", len(prompts), image_size=64)
ddim = DDIMScheduler.from_config(pipe.scheduler.config)
acp, final_alpha = ddim.alphas_cumprod.float(), float(ddim.final_alpha_cumprod)


def grid(steps: int) -> list[int]:
    ddim.set_timesteps(steps)
    return ddim.timesteps.tolist()


HIGH8, LOW8 = [t for t in grid(8) if t >= 500], [t for t in grid(8) if t < 500]
HIGH50, LOW50 = [t for t in grid(50) if t >= 500], [t for t in grid(50) if t < 500]
ROWS = {
    "cfg 50": [(t, "cfg") for t in grid(50)],
    "none 50": [(t, "none") for t in grid(50)],
    "student 4 + plain 4": [(t, "guide") for t in HIGH8] + [(t, "none") for t in LOW8],
    "student 4 + plain 26": [(t, "guide") for t in HIGH8] + [(t, "none") for t in LOW50],
    "cfg 25 + plain 4": [(t, "cfg") for t in HIGH50] + [(t, "none") for t in LOW8],
    "cfg 25 + plain 26": [(t, "cfg") for t in HIGH50] + [(t, "none") for t in LOW50],
}
if row_set == "first-step":
    ROWS = {name: ROWS[name] for name in ("cfg 50", "none 50")} | {
        "cfg 1 + student 3 + plain 4": [(999, "cfg")] + [(t, "guide") for t in HIGH8[1:]] + [(t, "none") for t in LOW8],
        "cfg 2 + student 3 + plain 4": [(t, "cfg") for t in grid(16)[:2]] + [(t, "guide") for t in HIGH8[1:]] + [(t, "none") for t in LOW8],
        "first5 1 + student 3 + plain 4": [(999, "first5")] + [(t, "guide") for t in HIGH8[1:]] + [(t, "none") for t in LOW8],
    }
if row_set == "schedule":
    G16 = grid(16)
    ROWS = {name: ROWS[name] for name in ("cfg 50", "none 50")} | {
        "s16 2 + s8 3 + plain 3": [(t, "s16") for t in G16[:2]] + [(t, "guide") for t in HIGH8[1:]] + [(t, "none") for t in (499, 333, 166)],
        "s16 4 + s8 2 + plain 2": [(t, "s16") for t in G16[:4]] + [(t, "guide") for t in HIGH8[2:]] + [(t, "none") for t in (499, 249)],
        "s16 2 + s8 3 + plain 4": [(t, "s16") for t in G16[:2]] + [(t, "guide") for t in HIGH8[1:]] + [(t, "none") for t in LOW8],
    }
for k in (1, 2, 3) if row_set == "main" else ():  # 50-step CFG down to the student's k-th timestep, then its remaining guided steps, then plain
    ROWS[f"cfg to {HIGH8[k]} + student {4 - k} + plain 4"] = ([(t, "cfg") for t in grid(50) if t > HIGH8[k]] + [(t, "guide") for t in HIGH8[k:]]
                                                             + [(t, "none") for t in LOW8])


@torch.no_grad()
def run(segments, batch: list[str], start: int):
    generators = [torch.Generator().manual_seed(SEED * 1_000_003 + start + i) for i in range(len(batch))]
    x = randn_tensor((len(batch), 4, 16, 16), generator=generators) * ddim.init_noise_sigma  # the pipeline's noise
    embeds, empty = pipe.encode_prompt(batch, "cpu", 1, True)
    for k, (t, mode) in enumerate(segments):
        t_next = segments[k + 1][0] if k + 1 < len(segments) else -1
        a, s = _alpha_sigma(acp, torch.tensor([t]), final_alpha)
        a_n, s_n = _alpha_sigma(acp, torch.tensor([t_next]), final_alpha)
        pipe.guide = GUIDES.get(mode)
        output = pipe.mode_noise_pred("guide" if mode in GUIDES else mode, x, torch.tensor(t), embeds, empty if mode == "cfg" else None, W)
        x = ddim_step(predicted_x0(output, x, a, s, "v_prediction"), x, a, s, a_n, s_n)
    decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")


results, sampled = [], {}
for name, segments in ROWS.items():
    sampled[name] = [image for start in range(0, len(prompts), BATCH) for image in run(segments, prompts[start : start + BATCH], start)]
    adherence = _adherence_split(sampled[name], prompts, "flat")
    row = {"row": name, "unet_calls_per_image": sum(2 if mode == "cfg" else 1 for _, mode in segments),
           "guide_calls": sum(mode in GUIDES for _, mode in segments), "fid": scorer.score(sampled[name]),
           "adherence": adherence[0], "adherence_1_2": adherence[1:]}
    if name not in ("cfg 50", "none 50"):
        row["image_gap_vs_cfg50"] = gap_closed(image_mse(sampled[name], sampled["cfg 50"]), image_mse(sampled["none 50"], sampled["cfg 50"]))
    results.append(row)
    print(json.dumps(row), flush=True)
json.dump({"w": W, "images": images, "seed": SEED, "rows": results}, open(out, "w"), indent=1)
