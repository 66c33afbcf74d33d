#!/usr/bin/env bash
# Rebuild every shipped asset of the embedded default model from scratch, in order, on CPU.
# Times are what each step took on the 2-core development machine (see docs/embedded-model.md).
# Everything is deterministic from the seeds in the configs; each run writes runs/<name>/{config.json,log.jsonl}.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=src/pnpguide/assets

# 1. VAE, 64x64x3 <-> 16x16x4, on all four styles (~10 min)
pnpguide --threads 2 train-vae --output-dir runs/vae --max-steps 1200 --checkpointing-steps 250

# 2. text-to-image UNet on cached latents, v-prediction, 10% empty captions, EMA (~55 min)
pnpguide --threads 2 train-base --vae-dir runs/vae/vae --output-dir runs/base --max-steps 4500
python scripts/ship_base.py runs/base/pipeline

# 3. and 4. run as two single-threaded tracks side by side (the 2 cores are used better that way)
# 3. fine-tunes the guide is later plugged into: a full UNet fine-tune (pastel) and a LoRA (outline)
pnpguide --threads 1 finetune --base "$ASSETS/base" --style pastel --method full --output-dir runs/ft-pastel --max-steps 400 --batch-size 32
pnpguide --threads 1 finetune --base "$ASSETS/base" --style outline --method lora --learning-rate 1e-3 --output-dir runs/lora-outline --max-steps 400 --batch-size 32
python scripts/ship_finetunes.py runs/ft-pastel/pipeline runs/lora-outline/lora

# 4. guides for the embedded base (x_t from noised dataset latents), and a full guide from teacher trajectories to compare the sources
pnpguide --threads 1 distill --size tiny --output-dir runs/guide-tiny --max-steps 1200
pnpguide --threads 1 distill --size full --learning-rate 3e-4 --output-dir runs/guide-full --max-steps 600
pnpguide --threads 1 distill --size full --learning-rate 3e-4 --source trajectories --output-dir runs/guide-full-traj --max-steps 600
python scripts/ship_guide.py runs/guide-tiny/guide "$ASSETS/guides/tiny"
python scripts/ship_guide.py runs/guide-full/guide "$ASSETS/guides/full"

# 5. the FID feature network for `pnpguide eval` (~22 min on one core: 1500 steps, then --resume latest to 3000)
pnpguide --threads 1 train-features --output-dir runs/features --max-steps 3000
python scripts/ship_features.py runs/features/features "$ASSETS/features/shapes"

# 6. step distillation of the tiny guide, 32 -> 16 -> 8 DDIM steps, true CFG as the first teacher (~40 min on one core;
#    the full guide, not shipped, was distilled the same way with --learning-rate 1e-4 --max-steps 600 for comparison)
pnpguide --threads 1 distill-steps --guide runs/guide-tiny/guide --output-dir runs/steps-tiny --teacher-steps 32 --student-steps 8 \
    --max-steps 900 --batch-size 32 --learning-rate 5e-4 --checkpointing-steps 150
python scripts/ship_guide.py runs/steps-tiny/guide-16 "$ASSETS/guides/tiny-16step"
python scripts/ship_guide.py runs/steps-tiny/guide-8 "$ASSETS/guides/tiny-8step"
