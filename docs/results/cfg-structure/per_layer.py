"""Per-layer sweep: extrapolate one cross-attention layer at a time, per-step gap closed at the teacher's states."""
import sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from attn_guidance import *

pipe = load_base(); unet = pipe.unet
prompts = eval_prompts(16)
emb_all = encode_captions(pipe, prompts + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
w = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
cfg, none, _ = predictors(pipe, None, empty)
states = []
sample(pipe, cfg, emb, w, 25, 0, record=lambda t, x: states.append((t, x.clone())))
picked = states[::3]
targets = [(t, x, cfg(x, t, emb, w), none(x, t, emb, w)) for t, x in picked]
guide = AttentionGuide(unet, empty, lambda w, t: 1.0)
names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
procs = dict(unet.attn_processors)
def run(scales):
    for n in names:
        procs[n].layer_scale = scales.get(n, 1.0)
    eg = en = 0.0
    with torch.no_grad():
        for t, x, oc, on in targets:
            og = unet(x, t, emb).sample
            eg += ((og - oc) ** 2).sum().item(); en += ((on - oc) ** 2).sum().item()
    return 1 - eg / en
for lam in (1.5, 2.0, w, 2 * w):
    row = [f"{run({n: lam}):+.3f}" for n in names]
    print(f"lam {lam}: all {run({n: lam for n in names}):+.3f} | " + " ".join(row), flush=True)
print(names)
