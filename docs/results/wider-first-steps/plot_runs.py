"""Validation loss (held-out teacher runs) and training loss (mean of each window of steps) of several runs against
their training minutes, one plot: runs compared at the same CPU time.
Usage: python plot_runs.py OUT.png LABEL=RUN/log.jsonl [LABEL=RUN/log.jsonl ...]"""
import json, sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6.5, 3.8))
for spec in sys.argv[2:]:
    label, path = spec.split("=", 1)
    rows = [json.loads(line) for line in open(path)]
    held_out = [(r["elapsed_s"] / 60, r["validation_loss"]) for r in rows if "validation_loss" in r]
    train = [(r["elapsed_s"] / 60, r["loss"]) for r in rows if "loss" in r]
    window = max(1, len(train) // 12)
    means = [(sum(m for m, _ in train[i:i + window]) / window, sum(l for _, l in train[i:i + window]) / window)
             for i in range(0, len(train) - window + 1, window)]
    line, = ax.plot(*zip(*held_out), "s-", label=f"{label}: validation")
    ax.plot(*zip(*means), "--", color=line.get_color(), alpha=0.6, label=f"{label}: training (window mean)")
ax.set_xlabel("training minutes (1 CPU thread each)"), ax.set_ylabel("loss (per-timestep normalised)")
ax.grid(alpha=0.3), ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=120)
print("wrote", sys.argv[1])
