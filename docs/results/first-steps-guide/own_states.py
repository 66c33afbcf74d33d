"""Where guide-then-carry loses to CFG-then-carry: per step, on the sampler's OWN trajectory, the share of CFG's
correction its output reproduces at the state it is in (1 - |out - cfg|^2 / |cond - cfg|^2, cfg and cond computed at
that same state), for CFG-then-carry and for a guide-then-carry, K = 5, 48 held-out prompts, one w.
Usage: python own_states.py GUIDE W OUT.json [threads]"""
import json, sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent / "fidelity-diagnosis"))
from harness import load_base, noise, eval_prompts
from diffusers import DDIMScheduler
from pnpguide import CorrectionCarry, PlugAndPlayPipeline
from pnpguide.embedded import shapes
from pnpguide.loading import load_guide

guide_path, w, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
pipe = PlugAndPlayPipeline.from_pipe(load_base(), guide=load_guide(guide_path).eval())
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
carry = CorrectionCarry.fit(pipe, shapes.split_captions(64, split="train", seed=7), full_steps=5, num_inference_steps=25)
prompts, latents = eval_prompts(48), noise(48, 0)
_, empty = pipe.encode_prompt(prompts, "cpu", 1, True)


def own_states(mode):
    closed = []

    @torch.no_grad()
    def record(t, x, output, embeds, *rest):
        cfg, cond = pipe.cfg_outputs(x, t, embeds, empty, w)
        closed.append(round(1 - (output - cfg).pow(2).sum().item() / (cond - cfg).pow(2).sum().item(), 3))

    with torch.no_grad():
        pipe(prompts, latents=latents, num_inference_steps=25, guidance_scale=w, mode=mode, correction_carry=carry,
             on_model_output=record, output_type="latent")
    return closed


result = {"w": w, "cfg then carried": own_states("cfg"), f"{guide_path} then carried": own_states("guide")}
for row, closed in result.items():
    print(row, closed, flush=True)
json.dump(result, open(out, "w"), indent=1)
