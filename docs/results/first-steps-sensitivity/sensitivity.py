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
from harness import load_base, ddim, noise, eval_prompts, decode, CACHE
from carry_fit import fit_carry
from safetensors.torch import load_file
from pnpguide.loading import encode_captions

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
net = Corrector(in_channels=8, width=32); net.load_state_dict(torch.load(sys.argv[1])); net.eval()
pipe = load_base(); unet = pipe.unet
emb_all = encode_captions(pipe, eval_prompts(48) + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
cached = load_file(CACHE / "eval-embedded-n48-s25-seed0.safetensors")


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
for w in (3.0, 5.0, 7.5):
    carry = fit_carry(pipe, empty, w)
    ref, none = cached[f"cfg{w}"], cached["none"]
    base = ((none - ref) ** 2).mean().item()
    for name, part in PARTS.items():
        img = sample(w, part, carry)
        result.setdefault(name, {})[w] = round(1 - ((img - ref) ** 2).mean().item() / base, 3)
        print(w, name, result[name][w], flush=True)
json.dump(result, open(sys.argv[2], "w"), indent=1)
