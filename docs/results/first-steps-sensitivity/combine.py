"""Closed loop on the harness with one network per step range: STEP0 weights at the first step, REST at steps 1-4
(stop 23's 32-channel network, non-recurrent), then the correction carried. Usage: python combine.py STEP0 REST OUT.json"""
import json, sys, torch
from pathlib import Path
R = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(R / "output-guide")); sys.path.insert(0, str(R / "fidelity-diagnosis")); sys.path.insert(0, str(R / "recurrent-correction"))
from corrector import Corrector
from harness import load_base, ddim, noise, decode
from closed_loop import carried_image_gaps, held_out_embeddings

torch.set_num_threads(1)
nets = []
for path in sys.argv[1:3]:
    n = Corrector(in_channels=8, width=32); n.load_state_dict(torch.load(path)); nets.append(n.eval())
pipe = load_base(); unet = pipe.unet
e, empty = held_out_embeddings(pipe)


@torch.no_grad()
def sample(w, carry):
    s = ddim(pipe, 25); z = noise(48, 0); dk = None
    for k, t in enumerate(s.timesteps):
        z_in = s.scale_model_input(z, t)
        c = unet(z_in, t, encoder_hidden_states=e).sample
        dk = nets[min(k, 1)](torch.cat([z_in, c], 1), torch.as_tensor(t), e) if k < 5 else carry[k] * dk
        z = s.step(c + (w - 1) * dk, t, z).prev_sample
    return decode(pipe, z)


result = {"step0": sys.argv[1], "rest": sys.argv[2], "image_gap_closed": carried_image_gaps(pipe, empty, sample)}
print(result, flush=True)
json.dump(result, open(sys.argv[3], "w"), indent=1)
