"""Does the step before's correction help predict this step's? Train the stop-22 experiment's output network
(output-guide/corrector.py, 32 channels) on the first five CFG steps (make_states.py), reading x_t and cond
(control) or x_t, cond and d_{k-1} (recurrent, teacher-forced), with the per-timestep normalised loss. Then:
- per step, on held-out trajectories (teacher-forced): gap closed 1 - |d_hat - d|^2 / |d|^2;
- closed loop on the harness's 48 held-out prompts: the network for steps 0-4 (reading its own previous
  estimate), then the correction carried (d_k = a_k d_{k-1}, a_k fitted as in carry.py): image gap closed.
Usage: python train_recurrent.py --recurrent|--no-recurrent --out PREFIX"""
import argparse, json, sys, time, torch
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "output-guide")); sys.path.insert(0, str(HERE.parent / "fidelity-diagnosis"))
from corrector import Corrector, train as train_loop

p = argparse.ArgumentParser()
p.add_argument("--states", default="/tmp/recur/states-0.pt")
p.add_argument("--recurrent", action=argparse.BooleanOptionalAction, default=True)
p.add_argument("--width", type=int, default=32); p.add_argument("--steps", type=int, default=2000)
p.add_argument("--batch", type=int, default=64); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--minutes", type=float, default=1e9); p.add_argument("--threads", type=int, default=1)
p.add_argument("--holdout", type=int, default=256); p.add_argument("--out", required=True)
p.add_argument("--load", action="store_true", help="skip training: evaluate the weights saved at --out")
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
S = torch.load(a.states)
x, t, cond, d_prev, idx, emb = S["x"], S["t"], S["cond"], S["d_prev"], S["idx"], S["emb"]
d = cond - S["uncond"]
held = idx >= len(emb) - a.holdout
train = ~held
gap = {int(s): d[(t == s) & train].pow(2).mean() for s in t.unique()}
norm = torch.stack([gap[int(s)] for s in t])


def inputs(x, c, dp):
    return torch.cat([x, c, dp] if a.recurrent else [x, c], 1)


net = Corrector(in_channels=12 if a.recurrent else 8, width=a.width)
rows = train.nonzero().flatten()


def batch_loss():
    b = rows[torch.randint(0, len(rows), (a.batch,))]
    pred = net(inputs(x[b], cond[b], d_prev[b]), t[b], emb[idx[b]])
    return ((pred - d[b]).pow(2).mean((1, 2, 3)) / norm[b]).mean()


start = time.time()
if a.load:
    net.load_state_dict(torch.load(a.out + ".pt"))
steps_taken = 0 if a.load else train_loop(net, batch_loss, a.steps, a.lr, a.minutes)
torch.save(net.state_dict(), a.out + ".pt")
net.eval()
result = {"recurrent": a.recurrent, "steps_trained": steps_taken, "minutes": round((time.time() - start) / 60, 1), "per_step_teacher_forced": {}}
with torch.no_grad():
    for s in sorted(t.unique().tolist(), reverse=True):
        m = held & (t == s)
        pred = net(inputs(x[m], cond[m], d_prev[m]), t[m], emb[idx[m]])
        result["per_step_teacher_forced"][int(s)] = round(1 - (pred - d[m]).pow(2).sum().item() / d[m].pow(2).sum().item(), 3)
print("per step (teacher-forced, held-out):", result["per_step_teacher_forced"], flush=True)

# closed loop, on the harness
from harness import load_base, ddim, noise, eval_prompts, decode, CACHE
from safetensors.torch import load_file
from carry_fit import fit_carry
from pnpguide.loading import encode_captions
pipe = load_base(); unet = pipe.unet
empty = encode_captions(pipe, [""])
K = len(gap)


@torch.no_grad()
def sample(e, w, carry):
    s = ddim(pipe, 25); z = noise(len(e), 0); dk = torch.zeros_like(z)
    for k, tt in enumerate(s.timesteps):
        z_in = s.scale_model_input(z, tt)
        c = unet(z_in, tt, encoder_hidden_states=e).sample
        dk = net(inputs(z_in, c, dk), torch.as_tensor(tt), e) if k < K else carry[k] * dk
        z = s.step(c + (w - 1) * dk, tt, z).prev_sample
    return decode(pipe, z)


e = encode_captions(pipe, eval_prompts(48))
cached = load_file(CACHE / "eval-embedded-n48-s25-seed0.safetensors")
result["image_gap_closed"] = {}
for w in (3.0, 5.0, 7.5):
    img, ref, none = sample(e, w, fit_carry(pipe, empty, w)), cached[f"cfg{w}"], cached["none"]
    result["image_gap_closed"][w] = round(1 - ((img - ref) ** 2).mean().item() / ((none - ref) ** 2).mean().item(), 3)
print("image gap closed (steps 0-4 network, then carried):", result["image_gap_closed"], flush=True)
json.dump(result, open(a.out + ".json", "w"), indent=1)
