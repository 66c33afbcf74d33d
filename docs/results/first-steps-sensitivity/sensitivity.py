"""Which part of the first-steps network's error costs the image? Closed loop on the harness (48 held-out prompts,
25 DDIM steps, same noise, vs diffusers' CFG images): CFG's own correction d_k = cond_k - uncond_k at steps 0-4, plus
a chosen part of the network's error e_k = d_hat_k - d_k (at the state reached), then d_k carried (a_k d_{k-1}).
Parts: none (CFG then carried), all (the network itself), step k only, low / high spatial frequencies.
Usage: python sensitivity.py WEIGHTS OUT.json [threads]"""
import json, sys, torch
import torch.nn.functional as F
from pathlib import Path
R = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(R / "output-guide")); sys.path.insert(0, str(R / "fidelity-diagnosis")); sys.path.insert(0, str(R / "recurrent-correction"))
from corrector import Corrector
from harness import load_base
from carry_fit import fit_carry
from closed_loop import WS, held_out_embeddings, image_gap, sample as closed_loop

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
net = Corrector(in_channels=8, width=32); net.load_state_dict(torch.load(sys.argv[1])); net.eval()
pipe = load_base(); unet = pipe.unet
emb, empty = held_out_embeddings(pipe)


def low(e, factor=4):
    return F.interpolate(F.avg_pool2d(e, factor), scale_factor=factor, mode="bilinear", align_corners=False)


PARTS = {"none": lambda e, k: 0 * e, "all": lambda e, k: e,
         **{f"step {j} only": (lambda j: lambda e, k: e if k == j else 0 * e)(j) for j in range(5)},
         "low (4x4 pooled)": lambda e, k: low(e), "high (the rest)": lambda e, k: e - low(e),
         "channel mean (per pixel)": lambda e, k: e.mean(1, keepdim=True).expand_as(e),
         "spatial mean (per channel)": lambda e, k: e.mean((2, 3), keepdim=True).expand_as(e)}


def sample(w, part, carry):
    def correction(k, x, t, c, d):
        if k >= 5:
            return carry[k] * d
        cfg = c - unet(x, t, encoder_hidden_states=empty.expand_as(emb)).sample  # CFG's own, at the state reached
        return cfg + part(net(torch.cat([x, c], 1), torch.as_tensor(t), emb) - cfg, k)
    return closed_loop(pipe, emb, w, correction)


result = {}
for w in WS:
    carry = fit_carry(pipe, empty, w)
    for name, part in PARTS.items():
        result.setdefault(name, {})[w] = image_gap(sample(w, part, carry), w)
        print(w, name, result[name][w], flush=True)
json.dump(result, open(sys.argv[2], "w"), indent=1)
