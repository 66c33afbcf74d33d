"""Image gap closed by guide-then-carry sampling through the library's own pipeline: an output guide for the first K
of 25 DDIM steps, then its correction carried on (pnpguide.CorrectionCarry), against the harness's cached CFG images
(diffusers' own CFG pipeline, the same 48 held-out prompts and noise). Rows: the guide at every step, and the guide
for K steps then carried, with the factors fitted on the model sampled (PNP_BASE) and, for a fine-tune, the embedded
base's factors too (no CFG on the fine-tune at all). Also, per step k < K at the CFG teacher's own states (cached
by the harness), the share of the step's gap closed: 1 - |guide - cfg|^2 / |cond - cfg|^2 (teacher-forced).
Usage: python eval_carry.py GUIDE K OUT.json [threads]"""
import json, sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent / "fidelity-diagnosis"))
from harness import load_base, noise, eval_prompts, CACHE
import os
from diffusers import DDIMScheduler
from safetensors.torch import load_file
from pnpguide import CorrectionCarry, PlugAndPlayPipeline
from pnpguide.embedded import shapes
from pnpguide.loading import load_guide, load_pipeline

guide_path, K, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
FIT_PROMPTS = shapes.split_captions(64, split="train", seed=7)


def pipeline(base_pipe):
    pipe = PlugAndPlayPipeline.from_pipe(base_pipe, guide=load_guide(guide_path).eval())
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


pipe = pipeline(load_base())
carries = {"fitted on this model": CorrectionCarry.fit(pipe, FIT_PROMPTS, full_steps=K, num_inference_steps=25)}
if os.environ.get("PNP_BASE"):
    carries["fitted on the embedded base"] = CorrectionCarry.fit(pipeline(load_pipeline(None)), FIT_PROMPTS, full_steps=K, num_inference_steps=25)
name = os.environ.get("PNP_BASE", "embedded").strip("/").replace("/", "_")
cached = load_file(CACHE / f"eval-{name}-n48-s25-seed0.safetensors")
prompts, latents = eval_prompts(48), noise(48, 0)


def gap(w, **kwargs):
    with torch.no_grad():
        images = pipe(prompts, latents=latents, num_inference_steps=25, guidance_scale=w, output_type="pt", **kwargs).images
    reference, none = cached[f"cfg{w}"], cached["none"]
    return round(1 - ((images - reference) ** 2).mean().item() / ((none - reference) ** 2).mean().item(), 3)


@torch.no_grad()
def per_step_closed(w):
    """Teacher-forced: the guide at the teacher's states of its first K steps (harness order: 25 steps x 48 prompts)."""
    embeds, empty = pipe.encode_prompt(prompts, "cpu", 1, True)
    closed = []
    for k, t in enumerate(pipe.scheduler.timesteps[:K]):
        x = cached[f"states{w}"][k]
        cfg = pipe.mode_noise_pred("cfg", x, t, embeds, empty, w)
        guide, cond = pipe.mode_noise_pred("guide", x, t, embeds, empty, w), pipe.mode_noise_pred("none", x, t, embeds, None, 1.0)
        closed.append(round(1 - (guide - cfg).pow(2).sum().item() / (cond - cfg).pow(2).sum().item(), 3))
    return closed


pipe.scheduler.set_timesteps(25)
result = {"guide": guide_path, "K": K, "base": name, "image_gap_closed": {}, "factors": {k: c.factors for k, c in carries.items()}}
rows = {"guide at every step": {}} | {f"guide for {K} steps, then carried ({k})": {"correction_carry": c} for k, c in carries.items()}
for row, kwargs in rows.items():
    result["image_gap_closed"][row] = {w: gap(w, mode="guide", **kwargs) for w in (3.0, 5.0, 7.5)}
    print(row, result["image_gap_closed"][row], flush=True)
result["per_step_closed_teacher_forced"] = {w: per_step_closed(w) for w in (3.0, 5.0, 7.5)}
print("per step, teacher-forced:", result["per_step_closed_teacher_forced"], flush=True)
json.dump(result, open(out, "w"), indent=1)
