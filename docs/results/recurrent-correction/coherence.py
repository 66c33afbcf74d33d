"""How much of CFG's correction d_k = cond_k - uncond_k at step k is carried over from the step before?

On CFG teacher trajectories (held-out captions, 25 DDIM steps, fixed w), fit per step, on half of the
trajectories, a few scalar coefficients predicting d_k from what a one-pass sampler has at step k
(its previous correction d_{k-1}, its conditional outputs c_k and c_{k-1}), and report, on the other half,
the per-step gap closed 1 - |d_hat - d|^2 / |d|^2 (open loop: the true d_{k-1} is given).
Usage: python coherence.py N W [threads]"""
import sys, json, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent / "fidelity-diagnosis"))
from harness import load_base, ddim, noise, eval_prompts
from pnpguide.loading import encode_captions

n, w = int(sys.argv[1]), float(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
pipe = load_base(); unet = pipe.unet
captions = eval_prompts(n)
emb_all = encode_captions(pipe, captions + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
s = ddim(pipe, 25)
x = noise(n, 1000)
C, U = [], []
with torch.no_grad():
    for t in s.timesteps:
        x_in = s.scale_model_input(x, t)
        u, c = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([empty.expand_as(emb), emb])).sample.chunk(2)
        C.append(c); U.append(u)
        x = s.step(u + w * (c - u), t, x).prev_sample
C, U = torch.stack(C), torch.stack(U)  # (steps, n, 4, 16, 16)
D = C - U
fit, test = torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1


def closed(pred, k):
    return 1 - ((pred[test] - D[k][test]) ** 2).sum().item() / (D[k][test] ** 2).sum().item()


def lstsq(features, k):
    """Scalar coefficients (one per feature) fitted on the fit half, applied to all."""
    A = torch.stack([f[fit].flatten() for f in features], 1)
    coef = torch.linalg.lstsq(A, D[k][fit].flatten().unsqueeze(1)).solution.flatten()
    return sum(a * f for a, f in zip(coef.tolist(), features)), coef.tolist()


rows = []
for k in range(1, len(s.timesteps)):
    prev = D[k - 1]
    cos = torch.nn.functional.cosine_similarity(D[k].flatten(1), prev.flatten(1)).mean().item()
    carry, a = lstsq([prev], k)
    linear, b = lstsq([prev, C[k], C[k - 1]], k)
    rows.append({"step": k, "t": int(s.timesteps[k]), "cos(d_k, d_k-1)": round(cos, 3), "carry: a*d_k-1": round(closed(carry, k), 3), "a": round(a[0], 3),
                 "linear: d_k-1, c_k, c_k-1": round(closed(linear, k), 3), "coefs": [round(v, 3) for v in b]})
    print(rows[-1], flush=True)
energy = (D ** 2).flatten(1).sum(1)
print("share of the gap's energy per step:", [round(v, 3) for v in (energy / energy.sum()).tolist()])
json.dump({"n": n, "w": w, "rows": rows, "energy_share": (energy / energy.sum()).tolist()},
          open(Path(__file__).parent / f"coherence-w{w}.json", "w"), indent=1)
