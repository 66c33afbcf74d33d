"""Training loss (mean of each 500 steps) and validation loss (held-out teacher runs) of a run's log.jsonl, one plot.
Usage: python plot_log.py RUN/log.jsonl OUT.png [title]"""
import json, sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = [json.loads(line) for line in open(sys.argv[1])]
train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
held_out = [(r["step"], r["validation_loss"]) for r in rows if "validation_loss" in r]
window = 500
means = {}
for step, loss in train:
    means.setdefault((step - 1) // window, []).append(loss)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([(k + 1) * window for k in means], [sum(v) / len(v) for v in means.values()], "o-", label=f"training loss (mean of {window} steps)")
ax.plot(*zip(*held_out), "s-", label="validation loss (held-out teacher runs)")
ax.set_xlabel("step"), ax.set_ylabel("loss (per-timestep normalised)"), ax.set_ylim(bottom=0), ax.grid(alpha=0.3), ax.legend()
ax.set_title(sys.argv[3] if len(sys.argv) > 3 else "")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
print("wrote", sys.argv[2])
