"""For a short adaptation of the default guide on bar-lora's own teacher trajectories: bar-lora fused into a pipeline
folder (distill takes a folder) and a prompt file of training captions, half ordinary, half naming the bar.
Usage: python adapt_prep.py OUT_PIPELINE_DIR OUT_PROMPTS_FILE [per_group]"""
import sys

from pnpguide.embedded import shapes
from pnpguide.loading import ASSETS_DIR, load_pipeline, save_pipeline

folder, prompt_file = sys.argv[1], sys.argv[2]
per_group = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
pipe = load_pipeline(None, lora=ASSETS_DIR / "finetunes" / "bar-lora")
pipe.fuse_lora()
pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
save_pipeline(pipe, folder, half=False)
ordinary = shapes.split_captions(per_group, split="train", seed=11)
bars = shapes.split_captions(per_group, split="train", seed=11, concept="bar")
open(prompt_file, "w").write("\n".join(ordinary + bars) + "\n")
print(len(set(ordinary)), len(set(bars)))
