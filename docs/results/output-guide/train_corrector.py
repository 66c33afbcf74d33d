"""Train the corrector on the teacher states of make_states.py (no backprop through the UNet: the UNet's
outputs are data here), with the per-timestep normalised loss, then score it with the fidelity harness."""
import argparse, json, sys, torch
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent / "fidelity-diagnosis"))
from corrector import Corrector, OutputGuide, train

p = argparse.ArgumentParser()
p.add_argument("--states", nargs="+", default=["/tmp/outguide/states-0.pt"])
p.add_argument("--features", action="store_true"); p.add_argument("--width", type=int, default=64)
p.add_argument("--steps", type=int, default=3000); p.add_argument("--batch", type=int, default=256)
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--minutes", type=float, default=1e9)
p.add_argument("--threads", type=int, default=1); p.add_argument("--out", default="/tmp/outguide/corrector")
p.add_argument("--eval", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
parts = [torch.load(s) for s in a.states]
cat = lambda k: torch.cat([q[k] for q in parts])
offsets = torch.cumsum(torch.tensor([0] + [len(q["emb"]) for q in parts[:-1]]), 0)
x, t, cond, d = cat("x"), cat("t"), cat("cond"), cat("cond") - cat("uncond")
idx = torch.cat([q["idx"] + o for q, o in zip(parts, offsets)]); emb = cat("emb")
feat = cat("feat") if a.features else None
# per-timestep mean gap: the loss divides by it, so t = 999 (about 35x the others) does not dominate
ts = t.unique(); gap = {int(s): d[t == s].pow(2).mean() for s in ts}
norm = torch.stack([gap[int(s)] for s in t])
net = Corrector(in_channels=8 + (64 if a.features else 0), width=a.width)
print(f"corrector params {sum(q.numel() for q in net.parameters()):,}", flush=True)


def batch_loss():
    b = torch.randint(0, len(x), (a.batch,))
    inputs = torch.cat([x[b], cond[b]] + ([feat[b].float()] if a.features else []), 1)
    pred = net(inputs, t[b], emb[idx[b]])
    return ((pred - d[b]).pow(2).mean((1, 2, 3)) / norm[b]).mean()


train(net, batch_loss, a.steps, a.lr, a.minutes)
torch.save(net.state_dict(), a.out + ".pt")
if a.eval:
    from harness import load_base, evaluate, summary
    pipe = load_base()
    res = evaluate(pipe, OutputGuide(net, a.features), ws=(3.0, 5.0, 7.5))
    print(summary(res), flush=True)
    json.dump({str(k): v for k, v in res.items()}, open(a.out + ".json", "w"), indent=1)
