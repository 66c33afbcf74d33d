"""Train the first-steps network on the sample, not per step: from CFG's own x_T, roll the network out through the
frozen UNet for the five steps (backpropagating through the UNet's activations, its weights frozen) and match CFG's
state after them, x_5, and its correction at step 4, d_4 (the one the carry repeats). Each term is divided by its
value for the starting weights. Warm-started; then closed loop on the harness (network for steps 0-4, carried).
Usage: python train_rollout.py --init PT --out PREFIX [--minutes M] [--steps N]"""
import argparse, json, sys, time, torch
from pathlib import Path
R = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(R / "output-guide")); sys.path.insert(0, str(R / "fidelity-diagnosis")); sys.path.insert(0, str(R / "recurrent-correction"))
from corrector import Corrector, train as train_loop
from harness import load_base, ddim
from closed_loop import carried_image_gaps, chains, held_out_embeddings, sample as closed_loop

p = argparse.ArgumentParser()
p.add_argument("--states", default="/tmp/recur/states-0.pt"); p.add_argument("--init", required=True)
p.add_argument("--steps", type=int, default=800); p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=1e-4); p.add_argument("--minutes", type=float, default=20)
p.add_argument("--threads", type=int, default=2); p.add_argument("--holdout", type=int, default=256)
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
S = torch.load(a.states)
N, K, chain = chains(S)
x, w, cond, uncond = chain(S["x"]), chain(S["w"])[:, 0], chain(S["cond"]), chain(S["uncond"])
emb = S["emb"]
pipe = load_base(); unet = pipe.unet
sched = ddim(pipe, 25); timesteps = sched.timesteps[:K]
assert (chain(S["t"])[0] == timesteps).all()
wv = w.view(-1, 1, 1, 1)
x_after = sched.step(uncond[:, -1] + wv * (cond[:, -1] - uncond[:, -1]), timesteps[-1], x[:, -1]).prev_sample  # CFG's x_5
d_last = cond[:, -1] - uncond[:, -1]
held = torch.arange(N) >= N - a.holdout
rows = (~held).nonzero().flatten()
net = Corrector(in_channels=8, width=32); net.load_state_dict(torch.load(a.init))


def rollout(b):
    """x_5 and d_hat_4 of the network sampling from CFG's x_T, one UNet pass per step (differentiable)."""
    z = x[b, 0]
    for k, t in enumerate(timesteps):
        c = unet(z, t, encoder_hidden_states=emb[b]).sample
        d_hat = net(torch.cat([z, c], 1), t.expand(len(b)), emb[b])
        z = sched.step(c + (wv[b] - 1) * d_hat, t, z).prev_sample
    return z, d_hat


def terms(b):
    z, d_hat = rollout(b)
    return (z - x_after[b]).pow(2).mean(), (d_hat - d_last[b]).pow(2).mean()


with torch.no_grad():
    b0 = rows[:256]
    scale = [sum(v) / 4 for v in zip(*(map(float, terms(b0[i:i + 64])) for i in range(0, 256, 64)))]
print("starting terms (x_5, d_4):", scale, flush=True)


def batch_loss():
    b = rows[torch.randint(0, len(rows), (a.batch,))]
    lx, ld = terms(b)
    return lx / scale[0] + ld / scale[1]


def heldout_terms():
    with torch.no_grad():
        b = held.nonzero().flatten()
        lx, ld = zip(*(map(float, terms(b[i:i + 64])) for i in range(0, len(b), 64)))
    return [round(sum(lx) / len(lx) / scale[0], 3), round(sum(ld) / len(ld) / scale[1], 3)]


at_start = heldout_terms()
start = time.time()
steps_taken = train_loop(net, batch_loss, a.steps, a.lr, a.minutes)
torch.save(net.state_dict(), a.out + ".pt")
net.eval()
result = {"init": a.init, "steps_trained": steps_taken, "minutes": round((time.time() - start) / 60, 1)}
result["heldout_x5_and_d4"] = {"before": at_start, "after": heldout_terms()}  # relative to the training rows' starting values
print(result, flush=True)

e, empty = held_out_embeddings(pipe)


def sample(w, carry):
    def correction(k, x, t, c, d):
        return net(torch.cat([x, c], 1), torch.as_tensor(t), e) if k < K else carry[k] * d
    return closed_loop(pipe, e, w, correction)


result["image_gap_closed"] = carried_image_gaps(pipe, empty, sample)
print("image gap closed:", result["image_gap_closed"], flush=True)
json.dump(result, open(a.out + ".json", "w"), indent=1)
