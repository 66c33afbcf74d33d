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
from harness import load_base, ddim, noise, decode
from carry_fit import fit_carry
from closed_loop import WS, held_out_embeddings, image_gap

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


@torch.no_grad()
def sample(w, part, carry):
    s = ddim(pipe, 25); z = noise(48, 0); dk = None
    for k, t in enumerate(s.timesteps):
        z_in = s.scale_model_input(z, t)
        if k < 5:
            u, c = unet(torch.cat([z_in, z_in]), t, encoder_hidden_states=torch.cat([empty.expand_as(emb), emb])).sample.chunk(2)
            d = c - u
            dk = d + part(net(torch.cat([z_in, c], 1), torch.as_tensor(t), emb) - d, k)
        else:
            c = unet(z_in, t, encoder_hidden_states=emb).sample
            dk = carry[k] * dk
        z = s.step(c + (w - 1) * dk, t, z).prev_sample
    return decode(pipe, z)


result = {}
for w in WS:
    carry = fit_carry(pipe, empty, w)
    for name, part in PARTS.items():
        result.setdefault(name, {})[w] = image_gap(sample(w, part, carry), w)
        print(w, name, result[name][w], flush=True)
json.dump(result, open(sys.argv[2], "w"), indent=1)
