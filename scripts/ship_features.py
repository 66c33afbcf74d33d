"""Copy the trained FID feature network into the package in fp16 safetensors (it loads back as fp32)."""

import shutil
import sys
from pathlib import Path

import torch

from pnpguide.embedded.features import ShapesFeatureNet

if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    shutil.rmtree(target, ignore_errors=True)
    ShapesFeatureNet.from_pretrained(str(source), use_safetensors=True).to(torch.float16).save_pretrained(target, safe_serialization=True)
    print(target)
