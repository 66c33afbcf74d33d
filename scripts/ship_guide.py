"""Copy a trained guide into the package in fp16 safetensors (it loads back as fp32, like the base).

--default-guidance-interval T_LOW T_HIGH records where the guide's guidance was measured to pay; the pipeline then
guides only inside it unless a call gives its own guidance_interval (docs/guides.md, stop 31).
"""

import argparse
import shutil
from pathlib import Path

import torch

from pnpguide.loading import load_guide

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--default-guidance-interval", type=float, nargs=2, metavar=("T_LOW", "T_HIGH"))
    args = parser.parse_args()
    guide = load_guide(args.source).to(torch.float16)
    if args.default_guidance_interval:
        guide.register_to_config(default_guidance_interval=tuple(args.default_guidance_interval))
    shutil.rmtree(args.target, ignore_errors=True)
    guide.save_pretrained(args.target, safe_serialization=True)
    print(args.target)
