"""Sampling with CFG's correction carried over from step to step, one UNet pass per carried step.

Steps k < K get their correction d_k = cond_k - uncond_k from a source ("cfg": a second UNet pass; "output": the
shipped output guide's prediction); every later step runs only the conditional pass and uses
d_k = a_k * d_{k-1}, with a_k fitted per step and w by least squares on training captions' CFG trajectories
(coherence.py showed d_k is 0.94-0.99 cosine-similar to d_{k-1} from step 5 on). Image gap closed against
diffusers-equivalent CFG (the harness's cached images), 48 held-out prompts, same noise.
On a fine-tune (PNP_BASE=folder) the factors are fitted on that model and CFG is its own.
Usage: python carry.py [threads] [sources: cfg,output] [out.json]"""
import os, sys, json, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent / "fidelity-diagnosis"))
from harness import load_base, ddim, noise, eval_prompts, decode, CACHE
from safetensors.torch import load_file
from pnpguide.loading import encode_captions, load_guide
from carry_fit import fit_carry

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
pipe = load_base(); unet = pipe.unet
guide = load_guide("src/pnpguide/assets/guides/output").eval()
empty = encode_captions(pipe, [""])
STEPS = 25


def unet_pair(x_in, t, emb):
    u, c = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([empty.expand_as(emb), emb])).sample.chunk(2)
    return c, u


@torch.no_grad()
def sample(emb, w, source, K, a):
    s = ddim(pipe, STEPS); x = noise(len(emb), 0); d = None
    for k, t in enumerate(s.timesteps):
        x_in = s.scale_model_input(x, t)
        if k < K and source == "cfg":
            c, u = unet_pair(x_in, t, emb); d = c - u
        else:
            c = unet(x_in, t, encoder_hidden_states=emb).sample
            if k < K:  # source "output": the guide's predicted cond - uncond
                d = guide(x_in, t, emb, torch.full((len(emb),), w), unet_output=c).sample / (w - 1)
            elif d is not None:
                d = a[k] * d
        x = s.step(c if d is None else c + (w - 1) * d, t, x).prev_sample
    return decode(pipe, x)


prompts = eval_prompts(48)
emb = encode_captions(pipe, prompts)
base_name = os.environ.get("PNP_BASE", "embedded").strip("/").replace("/", "_")
cached = load_file(CACHE / f"eval-{base_name}-n48-s25-seed0.safetensors")
sources = (sys.argv[2] if len(sys.argv) > 2 else "cfg,output").split(",")
results = {}
for w in (3.0, 5.0, 7.5):
    a = fit_carry(pipe, empty, w, steps=STEPS)
    ref, none = cached[f"cfg{w}"], cached["none"]
    base = ((none - ref) ** 2).mean().item()
    runs = [("cfg", 25), ("cfg", 1), ("cfg", 2), ("cfg", 3), ("cfg", 5), ("output", 25), ("output", 1), ("output", 3), ("output", 5), ("output", 8), ("output", 12)]
    for source, K in [r for r in runs if r[0] in sources]:
        img = sample(emb, w, source, K, a)
        gap = 1 - ((img - ref) ** 2).mean().item() / base
        results[f"{source} K={K} w={w}"] = round(gap, 3)
        print(f"w={w} first {K} steps from {source}, then carried: image gap closed {gap:.3f}", flush=True)
    results[f"a w={w}"] = [round(v, 3) for v in a]
json.dump(results, open(sys.argv[3] if len(sys.argv) > 3 else Path(__file__).parent / "carry.json", "w"), indent=1)
