"""Score a corrector trained by train_corrector.py with the fidelity harness, on the base in PNP_BASE (default: the
embedded base; a fine-tune's folder measures plug-and-play against that model's own CFG).
Usage: eval_corrector.py WEIGHTS.pt OUT.json [--features]"""
import json, sys, torch
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent / "fidelity-diagnosis"))
from corrector import Corrector, OutputGuide
from harness import load_base, evaluate, summary

torch.set_num_threads(1)
features = "--features" in sys.argv
state = torch.load(sys.argv[1])
net = Corrector(in_channels=8 + (64 if features else 0), width=state["conv_in.weight"].shape[0]); net.load_state_dict(state)
res = evaluate(load_base(), OutputGuide(net, features), ws=(3.0, 5.0, 7.5))
print(summary(res), flush=True)
json.dump({str(k): v for k, v in res.items()}, open(sys.argv[2], "w"), indent=1)
