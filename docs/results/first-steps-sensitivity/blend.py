"""Can the guide's later estimates average out the error that the carry repeats? Closed loop on the harness (48
held-out prompts, 25 DDIM steps, vs diffusers' CFG images). Steps 0-4: the first-steps network (stop 23's, WEIGHTS)
or the shipped output guide; then d_k = alpha * a_k * d_{k-1} + (1 - alpha) * g_k, g_k the shipped output guide's
estimate at step k (alpha = 1: the carry alone; alpha = 0: the guide alone).
Usage: python blend.py WEIGHTS|output OUT.json ALPHAS [threads]"""
import json, sys, torch
from pathlib import Path
R = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(R / "output-guide")); sys.path.insert(0, str(R / "fidelity-diagnosis")); sys.path.insert(0, str(R / "recurrent-correction"))
from corrector import Corrector
from harness import load_base
from carry_fit import fit_carry
from closed_loop import WS, held_out_embeddings, image_gap, sample as closed_loop
from pnpguide import GuideModel

torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
alphas = [float(a) for a in sys.argv[3].split(",")]
pipe = load_base(); unet = pipe.unet
guide = GuideModel.from_pretrained("src/pnpguide/assets/guides/output").eval()
net = None
if sys.argv[1] != "output":
    net = Corrector(in_channels=8, width=32); net.load_state_dict(torch.load(sys.argv[1])); net.eval()
emb, empty = held_out_embeddings(pipe)


def guide_estimate(z_in, t, c, w):
    tt = torch.full((len(z_in),), int(t))
    return guide(z_in, tt, emb, torch.full((len(z_in),), w), unet_output=c).sample / (w - 1)


def sample(w, alpha, carry):
    def correction(k, x, t, c, d):
        if k < 5:
            return net(torch.cat([x, c], 1), torch.as_tensor(t), emb) if net is not None else guide_estimate(x, t, c, w)
        return alpha * carry[k] * d + (1 - alpha) * (guide_estimate(x, t, c, w) if alpha < 1 else 0)
    return closed_loop(pipe, emb, w, correction)


result = {}
for w in WS:
    carry = fit_carry(pipe, empty, w)
    for alpha in alphas:
        result.setdefault(f"alpha {alpha}", {})[w] = image_gap(sample(w, alpha, carry), w)
        print(w, alpha, result[f"alpha {alpha}"][w], flush=True)
json.dump(result, open(sys.argv[2], "w"), indent=1)
