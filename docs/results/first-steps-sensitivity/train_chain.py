"""Train stop 23's first-five-steps network (output-guide/corrector.py, 32 channels) on whole five-step chains of
CFG teacher states (recurrent-correction/make_states.py), warm-started from its stop-23 weights:
- --recurrent: it reads its *own* previous estimate d_hat_{k-1} (backpropagated through the chain), as in sampling,
  not the teacher's d_{k-1} as in stop 23 (exposure bias);
- --last-weight W: the last step's loss counts W times: its estimate is the one the carry repeats for 20 steps.
Then: per step on held-out chains (own estimates), and closed loop on the harness (network for steps 0-4, carried).
Usage: python train_chain.py --init PT --out PREFIX [--recurrent] [--last-weight W] [--minutes M]"""
import argparse, json, sys, time, torch
from pathlib import Path
R = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(R / "output-guide")); sys.path.insert(0, str(R / "fidelity-diagnosis")); sys.path.insert(0, str(R / "recurrent-correction"))
from corrector import Corrector, train as train_loop
from closed_loop import chains

p = argparse.ArgumentParser()
p.add_argument("--states", default="/tmp/recur/states-0.pt"); p.add_argument("--init", required=True)
p.add_argument("--recurrent", action="store_true"); p.add_argument("--last-weight", type=float, default=1.0)
p.add_argument("--steps", type=int, default=100000); p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=3e-4); p.add_argument("--minutes", type=float, default=22)
p.add_argument("--threads", type=int, default=1); p.add_argument("--holdout", type=int, default=256)
p.add_argument("--out", required=True)
p.add_argument("--rest", default=None, help="closed loop: weights of a (non-recurrent) network for the steps after these K, up to step 4")
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
S = torch.load(a.states)
N, K, chain = chains(S)  # per trajectory, steps in sampling order
x, t, cond, d = chain(S["x"]), chain(S["t"]), chain(S["cond"]), chain(S["cond"] - S["uncond"])
emb = S["emb"]
assert (chain(S["idx"]) == torch.arange(N).view(N, 1)).all()
held = torch.arange(N) >= N - a.holdout
gap = d[~held].pow(2).mean((0, 2, 3, 4))  # per step
weight = torch.ones(K); weight[-1] = a.last_weight

net = Corrector(in_channels=12 if a.recurrent else 8, width=32); net.load_state_dict(torch.load(a.init))


def run_chain(b):
    """The network's estimates along the chains b, each step reading its own estimate of the step before."""
    d_hat, out = torch.zeros_like(x[b, 0]), []
    for k in range(K):
        inputs = [x[b, k], cond[b, k]] + ([d_hat] if a.recurrent else [])
        d_hat = net(torch.cat(inputs, 1), t[b, k], emb[b])
        out.append(d_hat)
    return torch.stack(out, 1)


rows = (~held).nonzero().flatten()


def batch_loss():
    b = rows[torch.randint(0, len(rows), (a.batch,))]
    per_step = (run_chain(b) - d[b]).pow(2).mean((0, 2, 3, 4)) / gap
    return (per_step * weight).sum() / weight.sum()


start = time.time()
steps_taken = train_loop(net, batch_loss, a.steps, a.lr, a.minutes)
torch.save(net.state_dict(), a.out + ".pt")
net.eval()
result = {"recurrent": a.recurrent, "last_weight": a.last_weight, "init": a.init, "steps_trained": steps_taken,
          "minutes": round((time.time() - start) / 60, 1)}
with torch.no_grad():
    b = held.nonzero().flatten()
    est = torch.cat([run_chain(b[i:i + 64]) for i in range(0, len(b), 64)])
    result["per_step_own_estimates_heldout"] = [round(1 - (est[:, k] - d[b, k]).pow(2).sum().item() / d[b, k].pow(2).sum().item(), 3) for k in range(K)]
print(result, flush=True)

from harness import load_base
from closed_loop import carried_image_gaps, held_out_embeddings, sample as closed_loop
pipe = load_base(); unet = pipe.unet
rest = None
if a.rest:
    rest = Corrector(in_channels=8, width=32); rest.load_state_dict(torch.load(a.rest)); rest.eval()
last = 5 if rest is not None else K
e, empty = held_out_embeddings(pipe)


def sample(w, carry):
    def correction(k, x, t, c, d):
        if k < K:
            previous = [torch.zeros_like(c) if d is None else d] if a.recurrent else []
            return net(torch.cat([x, c] + previous, 1), torch.as_tensor(t), e)
        if k < last:
            return rest(torch.cat([x, c], 1), torch.as_tensor(t), e)
        return carry[k] * d
    return closed_loop(pipe, e, w, correction)


result["image_gap_closed"] = carried_image_gaps(pipe, empty, sample)
print("image gap closed:", result["image_gap_closed"], flush=True)
json.dump(result, open(a.out + ".json", "w"), indent=1)
