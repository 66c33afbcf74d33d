"""CFG at the first step with the unconditional pass replaced by an affine function of x_T (fitted by least squares
on 64 pure-noise unconditional outputs, other noises than the evaluation's), then the guide (or nothing): image gap
closed against CFG, 48 held-out prompts, 25 DDIM steps. Cost: one UNet pass per step, as the guide alone."""
import sys, json, torch
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fidelity-diagnosis"))
from harness import *
from pnpguide.loading import load_guide
from pnpguide.teacher import cfg_combine

torch.set_num_threads(2)
pipe = load_base(); unet = pipe.unet
name = sys.argv[1]
guide = None if name == "none" else load_guide(name).eval()
n, steps, ws = 48, 25, (3.0, 5.0, 7.5)
prompts = eval_prompts(n)
emb_all = encode_captions(pipe, prompts + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
cfg, none, gd = predictors(pipe, guide, empty)
s = ddim(pipe, steps); t0 = s.timesteps[0]


def design(x):  # per pixel: the 4 channels of x, and a bias per position
    b, c, h, w = x.shape
    return torch.cat([x.permute(0, 2, 3, 1).reshape(b, h * w, c), torch.eye(h * w).expand(b, -1, -1)], -1).reshape(b * h * w, c + h * w)


with torch.no_grad():
    fit_x = noise(64, 5000) * s.init_noise_sigma
    fit_uncond = unet(s.scale_model_input(fit_x, t0), t0, empty.expand(64, -1, -1)).sample
coef = torch.linalg.lstsq(design(fit_x), fit_uncond.permute(0, 2, 3, 1).reshape(-1, 4)).solution


def surrogate_uncond(x):
    return (design(x) @ coef).reshape(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)


base = os.environ.get("PNP_BASE", "embedded").strip("/").replace("/", "_")
cached = load_file(CACHE / f"eval-{base}-n{n}-s{steps}-seed0.safetensors")  # the CFG images hybrid.py cached
results = {}
for w in ws:
    calls = []
    def hybrid(x, t, e, w_):
        calls.append(t)
        if len(calls) == 1:
            return cfg_combine(surrogate_uncond(x), unet(x, t, e).sample, w_)
        return (gd if guide is not None else none)(x, t, e, w_)
    img = decode(pipe, sample(pipe, hybrid, emb, w, steps, 0))
    mse_g = ((img - cached[f"cfg{w}"]) ** 2).mean().item(); mse_n = ((cached["none"] - cached[f"cfg{w}"]) ** 2).mean().item()
    results[str(w)] = 1 - mse_g / mse_n
    print(f"{name}: first step CFG with the affine unconditional surrogate, w={w}: image gap closed {1 - mse_g / mse_n:.3f}", flush=True)
json.dump(results, open(HERE / f"surrogate-{Path(name).name}{'' if base == 'embedded' else '-on-' + base}.json", "w"), indent=1)
