"""Closed loop on the harness with one network per step range: STEP0 weights at the first step, REST at steps 1-4
(stop 23's 32-channel network, non-recurrent), then the correction carried. Usage: python combine.py STEP0 REST OUT.json"""
import json, sys, torch
from pathlib import Path
R = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(R / "output-guide")); sys.path.insert(0, str(R / "fidelity-diagnosis")); sys.path.insert(0, str(R / "recurrent-correction"))
from corrector import Corrector
from harness import load_base
from closed_loop import carried_image_gaps, held_out_embeddings, sample as closed_loop

torch.set_num_threads(1)
nets = []
for path in sys.argv[1:3]:
    n = Corrector(in_channels=8, width=32); n.load_state_dict(torch.load(path)); nets.append(n.eval())
pipe = load_base(); unet = pipe.unet
e, empty = held_out_embeddings(pipe)


def sample(w, carry):
    def correction(k, x, t, c, d):
        return nets[min(k, 1)](torch.cat([x, c], 1), torch.as_tensor(t), e) if k < 5 else carry[k] * d
    return closed_loop(pipe, e, w, correction)


result = {"step0": sys.argv[1], "rest": sys.argv[2], "image_gap_closed": carried_image_gaps(pipe, empty, sample)}
print(result, flush=True)
json.dump(result, open(sys.argv[3], "w"), indent=1)
