"""Stop 23's first-five-steps experiment network (train_recurrent.py --no-recurrent, /tmp/recur/no-recurrent.pt) per
step at the harness's CFG teacher states of held-out captions, as eval_carry.py measures the library guides
(stop 23 measured it on held-out trajectories of training captions). Usage: python per_step_experiment.py WEIGHTS"""
import json, sys, torch
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "output-guide")); sys.path.insert(0, str(HERE.parent / "fidelity-diagnosis"))
from corrector import Corrector
from harness import load_base, ddim, eval_prompts, CACHE
from safetensors.torch import load_file
from pnpguide.loading import encode_captions
from pnpguide.teacher import cfg_noise_pred

torch.set_num_threads(1)
net = Corrector(in_channels=8, width=32); net.load_state_dict(torch.load(sys.argv[1])); net.eval()
pipe = load_base(); unet = pipe.unet
emb_all = encode_captions(pipe, eval_prompts(48) + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
cached = load_file(CACHE / "eval-embedded-n48-s25-seed0.safetensors")
result = {}
with torch.no_grad():
    for w in (3.0, 5.0, 7.5):
        closed = []
        for k, t in enumerate(ddim(pipe, 25).timesteps[:5]):
            x = cached[f"states{w}"][k]
            cfg, cond = cfg_noise_pred(unet, x, t, emb, empty.expand_as(emb), w), unet(x, t, emb).sample
            guided = cond + (w - 1) * net(torch.cat([x, cond], 1), torch.as_tensor(t), emb)
            closed.append(round(1 - (guided - cfg).pow(2).sum().item() / (cond - cfg).pow(2).sum().item(), 3))
        result[w] = closed
print("per step, teacher-forced:", result)
json.dump(result, open(HERE / "experiment-network-per-step.json", "w"), indent=1)
