"""Can a cheap function of x_t stand in for the unconditional pass at the first, high-noise steps? At the CFG
teacher's own states (48 held-out prompts, w = 7.5, 25 DDIM steps), fit the unconditional output as an affine
function of x_t (a 1x1 convolution plus a bias map, least squares on 24 images) and score it on the other 24:
the per-step gap CFG-with-the-surrogate closes is 1 - |surrogate - uncond|^2 / |cond - uncond|^2."""
import sys, torch
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fidelity-diagnosis"))
from harness import *

torch.set_num_threads(1)
pipe = load_base(); unet = pipe.unet
w = float(sys.argv[1]) if len(sys.argv) > 1 else 7.5
prompts = eval_prompts(48)
emb_all = encode_captions(pipe, prompts + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
cached = load_file(CACHE / "eval-embedded-n48-s25-seed0.safetensors")
states = cached[f"states{w}"]
s = ddim(pipe, 25)
train, test = slice(0, 48, 2), slice(1, 48, 2)  # alternate: one- and two-object prompts on both sides
for i, t in enumerate(s.timesteps[:8]):
    x = states[i]
    with torch.no_grad():
        cond = unet(x, t, emb).sample
        uncond = unet(x, t, empty.expand_as(emb)).sample
    def design(x):  # per pixel: [x_1..x_4, 1] plus a per-position bias (one-hot position)
        n, c, h, ww = x.shape
        pix = x.permute(0, 2, 3, 1).reshape(n, h * ww, c)
        pos = torch.eye(h * ww).expand(n, -1, -1)
        return torch.cat([pix, pos], -1).reshape(n * h * ww, c + h * ww)
    target = uncond.permute(0, 2, 3, 1).reshape(-1, 4)
    A = design(x[train]); coef = torch.linalg.lstsq(A, target[: A.shape[0]]).solution
    pred = (design(x[test]) @ coef).reshape(24, 16, 16, 4).permute(0, 3, 1, 2)
    err = (pred - uncond[test]).pow(2).sum(); gap = (cond[test] - uncond[test]).pow(2).sum()
    print(f"step {i} t={int(t)}: per-step gap closed by CFG with the affine surrogate {1 - err / gap:+.3f}"
          f"  (|uncond - affine fit|^2 / |uncond|^2 = {err / uncond[test].pow(2).sum():.4f})", flush=True)
