"""Image gap closed when the first k of 25 steps use CFG (two passes) and the rest the guide (one pass);
guide "none": the rest unguided, the baseline that shows what the guide adds after the CFG steps."""
import sys, json, torch
torch.set_num_threads(2)
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fidelity-diagnosis"))
from harness import *
from pnpguide.loading import load_guide

pipe = load_base()
name, ks = sys.argv[1], [int(k) for k in sys.argv[2].split(",")]
guide = None if name == "none" else load_guide(name).eval()
n, steps, ws = 48, 25, (3.0, 5.0, 7.5)

prompts = eval_prompts(n)
emb_all = encode_captions(pipe, prompts + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
cfg, none, gd = predictors(pipe, guide, empty)
base = os.environ.get("PNP_BASE", "embedded").strip("/").replace("/", "_")
key = CACHE / f"eval-{base}-n{n}-s{steps}-seed0.safetensors"
if not key.exists():
    evaluate(pipe, guide or load_guide("tiny").eval(), ws=ws, n=n, steps=steps)
cached = load_file(key)
results = {}
for k in ks:
    for w in ws:
        calls = []
        def hybrid(x, t, e, w_):
            calls.append(t)
            return (cfg if len(calls) <= k else gd if guide is not None else none)(x, t, e, w_)
        img = decode(pipe, sample(pipe, hybrid, emb, w, steps, 0))
        mse_g = ((img - cached[f"cfg{w}"]) ** 2).mean().item(); mse_n = ((cached["none"] - cached[f"cfg{w}"]) ** 2).mean().item()
        results[f"k{k}-w{w}"] = 1 - mse_g / mse_n
        print(f"{name} k={k} w={w}: image gap closed {1 - mse_g / mse_n:.3f}  cost {(steps + k) / (2 * steps):.3f} of CFG", flush=True)
json.dump(results, open(HERE / f"hybrid-{Path(name).name}{'' if base == 'embedded' else '-on-' + base}.json", "w"), indent=1)
