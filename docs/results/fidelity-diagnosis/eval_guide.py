import json, sys, torch
torch.set_num_threads(1)
from pathlib import Path; sys.path.insert(0, str(Path(__file__).parent))
from harness import *
from pnpguide.loading import load_guide
pipe = load_base()
res = evaluate(pipe, load_guide(sys.argv[1] if len(sys.argv) > 1 else "tiny").eval(), ws=(3.0, 5.0, 7.5))
print(summary(res))
json.dump({str(k): v for k, v in res.items()}, open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/shipped_eval.json", "w"), indent=1)
for w, r in res.items(): print(w, r["per_step"])
