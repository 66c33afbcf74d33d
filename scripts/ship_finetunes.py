"""Copy fine-tunes into the package: the full fine-tune shares the base's frozen parts through symlinks.

A full fine-tune changes only the UNet; its VAE, text encoder, tokenizer and scheduler are the base's
files. Relative symlinks keep the folder a complete Stable Diffusion directory
(`StableDiffusionPipeline.from_pretrained` loads it) without shipping 26 MB twice.
"""

import os
import shutil
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "src" / "pnpguide" / "assets"
SHARED = ("vae", "text_encoder", "tokenizer", "scheduler")


def ship_full(pipeline_dir: Path, name: str = "pastel-full") -> Path:
    target = ASSETS / "finetunes" / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copytree(pipeline_dir / "unet", target / "unet")
    shutil.copy(pipeline_dir / "model_index.json", target / "model_index.json")
    for part in SHARED:
        os.symlink(Path("..") / ".." / "base" / part, target / part)
    return target


def ship_lora(lora_dir: Path, name: str = "outline-lora") -> Path:
    target = ASSETS / "finetunes" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(lora_dir, target)
    return target


if __name__ == "__main__":
    print(ship_full(Path(sys.argv[1])), ship_lora(Path(sys.argv[2])))
