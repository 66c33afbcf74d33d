"""Copy a trained guide into the package as a shipped guide: fp16 safetensors (it loads back as fp32), its correction carry,
and a model card with what was measured.

    python scripts/ship_guide.py runs/first5-neg/guide default --measured scripts/cards/default.md
    python scripts/ship_guide.py runs/g8b/guide-8 8-step

--default-guidance-interval T_LOW T_HIGH records where the guide's guidance was measured to pay: its policy guides only
inside it when the call has no negative prompt (docs/sampling.md). A grid student (distill-steps --student-timesteps
--unguided-below T) records its interval already; a student of the halving rounds does not.
"""

import argparse
import shutil
from pathlib import Path

import torch

from pnpguide.guides.base import SHIPPED_GUIDES_DIR
from pnpguide.loading import load_guide
from pnpguide.model_card import write_model_card

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a guide folder (a run's guide/)")
    parser.add_argument("name", help="the shipped guide's name")
    parser.add_argument("--default-guidance-interval", type=float, nargs=2, metavar=("T_LOW", "T_HIGH"))
    parser.add_argument("--measured", type=Path, default=None, help="a markdown file of measured figures, for the model card")
    args = parser.parse_args()
    guide = load_guide(args.source).to(torch.float16)
    if args.default_guidance_interval:
        guide.register_to_config(default_guidance_interval=tuple(args.default_guidance_interval))
    target = SHIPPED_GUIDES_DIR / args.name
    shutil.rmtree(target, ignore_errors=True)
    guide.register_to_config(_name_or_path=args.name)  # before saving: the folder names itself, not the run it came from
    guide.save_pretrained(target, safe_serialization=True)
    card = (args.source / "README.md").read_text() if (args.source / "README.md").is_file() else None
    write_model_card(target, guide, measured=args.measured.read_text() if args.measured else None,
                     command=card.split("```bash\n")[1].split("\n```")[0] if card and "```bash\n" in card else "pnpguide distill")
    print(target)
