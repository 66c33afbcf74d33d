"""Copy a trained guide into the package in fp16 safetensors (it loads back as fp32, like the base)."""

import shutil
import sys
from pathlib import Path

import torch

from pnpguide.loading import load_guide

if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    shutil.rmtree(target, ignore_errors=True)
    load_guide(source).to(torch.float16).save_pretrained(target, safe_serialization=True)
    print(target)
