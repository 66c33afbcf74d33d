#!/usr/bin/env bash
# Rebuild every shipped asset of the embedded default model from scratch, in order.
# Steps 1-3, 5 and 7 ran on the 2-core development machine (times as measured there, see docs/embedded-model.md);
# the guides (steps 4 and 6) were trained on a lent H200 by scripts/train_guides_gpu.sh, whose commands are given here
# one by one (add --max-minutes to bound any of them; on a CPU they take hours).
# Everything is deterministic from the seeds in the configs; each run writes runs/<name>/{config.json,log.jsonl}.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=src/pnpguide/assets

# 1. VAE, 64x64x3 <-> 16x16x4, on all four styles (~10 min)
pnpguide --threads 2 train-vae --output-dir runs/vae --max-steps 1200 --checkpointing-steps 250

# 2. text-to-image UNet on cached latents, v-prediction, 10% empty captions, EMA (~55 min)
pnpguide --threads 2 train-base --vae-dir runs/vae/vae --output-dir runs/base --max-steps 4500
# 2b. base-te3: the text encoder (MiniLM) cut to its first 3 layers, then 2,000 more UNet steps (~2 h on one core)
python -c "from pnpguide.loading import load_pipeline, save_pipeline; p = load_pipeline('runs/base/pipeline'); e = p.text_encoder; e.encoder.layer = e.encoder.layer[:3]; e.config.num_hidden_layers = 3; save_pipeline(p, 'runs/te3/init')"
pnpguide --threads 1 finetune --base runs/te3/init --style flat --method full --learning-rate 3e-4 --lr-warmup-steps 100 \
    --max-steps 2000 --batch-size 64 --num-images 40000 --use-ema --seed 5 --checkpointing-steps 400 --output-dir runs/te3/ft
python scripts/ship_base.py runs/te3/ft/pipeline

# 3. and 4. run as two single-threaded tracks side by side (the 2 cores are used better that way)
# 3. fine-tunes the guide is later plugged into: a full UNet fine-tune (pastel) and a LoRA (outline)
pnpguide --threads 1 finetune --base "$ASSETS/base" --style pastel --method full --output-dir runs/ft-pastel --max-steps 400 --batch-size 32
pnpguide --threads 1 finetune --base "$ASSETS/base" --style outline --method lora --learning-rate 1e-3 --output-dir runs/lora-outline --max-steps 400 --batch-size 32
python scripts/ship_finetunes.py runs/ft-pastel/pipeline runs/lora-outline/lora

# 4. guides for the embedded base, on a GPU (batch 256, noised dataset latents and CFG teacher trajectories mixed, EMA).
#    tiny: the latent guide D, then continued with a cosine decay (L1); full: reads the UNet's features, MSE, then the
#    per-timestep loss twice (B1, B2, F). The runs stopped by --max-minutes at 1,749 / 452 and 496 / 626 / 1,150 steps.
GPU=(--source mix --batch-size 256 --num-samples 20000 --trajectories 2048 --use-ema --log-every 50)
pnpguide distill --reads latent "${GPU[@]}" --learning-rate 1e-3 --lr-scheduler constant_with_warmup --lr-warmup-steps 100 \
    --max-steps 1749 --output-dir runs/gpu/D
pnpguide distill --reads latent "${GPU[@]}" --init-guide runs/gpu/D/guide --learning-rate 5e-4 --lr-scheduler cosine \
    --lr-warmup-steps 50 --max-steps 772 --output-dir runs/gpu/L1
FULL=(--size full --reads unet_features --scale-by-guidance "${GPU[@]}")
pnpguide distill "${FULL[@]}" --learning-rate 1e-3 --lr-scheduler constant_with_warmup --lr-warmup-steps 100 --max-steps 496 --output-dir runs/gpu/B1
pnpguide distill "${FULL[@]}" --init-guide runs/gpu/B1/guide --loss-weighting timestep --learning-rate 3e-4 --lr-scheduler cosine \
    --lr-warmup-steps 50 --max-steps 626 --output-dir runs/gpu/B2
pnpguide distill "${FULL[@]}" --init-guide runs/gpu/B2/guide --loss-weighting timestep --learning-rate 3e-4 --lr-scheduler cosine \
    --lr-warmup-steps 50 --max-steps 1494 --output-dir runs/gpu/F
python scripts/ship_guide.py runs/gpu/L1/guide "$ASSETS/guides/tiny"
python scripts/ship_guide.py runs/gpu/F/guide "$ASSETS/guides/full"

# 5. the FID feature network for `pnpguide eval` (~22 min on one core: 1500 steps, then --resume latest to 3000)
pnpguide --threads 1 train-features --output-dir runs/features --max-steps 3000
python scripts/ship_features.py runs/features/features "$ASSETS/features/shapes"

# 6. step distillation of the tiny guide, 32 -> 16 -> 8 DDIM steps, true CFG as the first teacher (GPU, 44 steps a round)
pnpguide distill-steps --guide runs/gpu/L1/guide --output-dir runs/gpu/L2 --teacher-steps 32 --student-steps 8 \
    --max-steps 44 --batch-size 256 --num-samples 20000 --learning-rate 5e-4 --lr-warmup-steps 20 --use-ema
python scripts/ship_guide.py runs/gpu/L2/guide-16 "$ASSETS/guides/tiny-16step"
python scripts/ship_guide.py runs/gpu/L2/guide-8 "$ASSETS/guides/tiny-8step"

# 7. the output guide (reads x_t and the UNet's conditional output, predicts cond - uncond): CFG teacher trajectories
#    (1,536 runs, ~24 min), then 2,000 steps of batch 64 with the per-timestep loss (~40 min), on 2 CPU threads.
#    Steps 7 and 8 ran before stop 26, when the teacher was called at every training step and an output guide's loss
#    was in output space (weighted by (w - 1)^2); the same commands now train faster, in units of cond - uncond, and
#    give another guide than the shipped one.
pnpguide --threads 2 distill --reads unet_output --source trajectories --trajectories 1536 --loss-weighting timestep \
    --batch-size 64 --learning-rate 1e-3 --lr-warmup-steps 100 --max-steps 2000 --output-dir runs/output-guide
python scripts/ship_guide.py runs/output-guide/guide "$ASSETS/guides/output"

# 8. the output guide reading negative prompts: step 7's guide given the negative input and trained 1,500 more steps
#    (~60 min on 2 CPU threads, run as 40 min then --resume latest; lr 5e-4, half the samples with a non-empty
#    negative), on the same trajectories (hard-link runs/output-guide/trajectories into the new folder to reuse them)
pnpguide --threads 2 distill --reads unet_output --source trajectories --trajectories 1536 --loss-weighting timestep \
    --batch-size 64 --learning-rate 5e-4 --lr-warmup-steps 50 --max-steps 1500 --negatives \
    --init-guide runs/output-guide/guide --output-dir runs/output-neg
python scripts/ship_guide.py runs/output-neg/guide "$ASSETS/guides/output-neg"

# 9. the output guide for the first 5 steps, shipped with its correction carry (stop 26): step 4 of
#    docs/results/first-steps-guide/command.txt (1,478 steps, 42 min), then 8,192 trajectories' first 5 steps stored
#    with the teacher's outputs (~10 min) and 9,000 more steps of batch 64 (68 min), on 2 CPU threads. The first
#    command ran in stop 24, before the loss was counted in units of cond - uncond.
pnpguide --threads 2 distill --reads unet_output --source trajectories --trajectories 1536 --loss-weighting timestep \
    --batch-size 64 --trajectory-first-steps 5 --learning-rate 1e-3 --max-steps 1500 --lr-warmup-steps 100 --output-dir runs/output-tiny-first5
pnpguide --threads 2 distill --reads unet_output --source trajectories --trajectories 8192 --trajectory-first-steps 5 \
    --loss-weighting timestep --batch-size 64 --learning-rate 1e-3 --lr-warmup-steps 50 --max-steps 9000 \
    --init-guide runs/output-tiny-first5/guide --output-dir runs/output-first5-v2
#    Stop 27: 32,768 trajectories (their first 128 shards are the 8,192 above: shard n depends on the seed and n, not
#    on the count) and 7,500 more steps at lr 5e-4 from that guide, 320 held-out runs scored at every checkpoint (57 min).
pnpguide --threads 2 distill --reads unet_output --source trajectories --trajectories 32768 --trajectory-first-steps 5 \
    --loss-weighting timestep --batch-size 64 --learning-rate 5e-4 --lr-warmup-steps 50 --max-steps 7500 \
    --init-guide runs/output-first5-v2/guide --validation-trajectories 320 --output-dir runs/output-first5-32k
#    Stop 28: 32,768 fresh trajectories (seed 1) and 9,000 more steps at lr 3e-4 from that guide (62 min on 1 thread).
pnpguide --threads 1 distill --reads unet_output --source trajectories --trajectories 32768 --trajectory-first-steps 5 \
    --loss-weighting timestep --batch-size 64 --learning-rate 3e-4 --lr-warmup-steps 50 --max-steps 9000 --seed 1 \
    --init-guide runs/output-first5-32k/guide --validation-trajectories 320 --output-dir runs/first5-s1-c32b
python scripts/ship_guide.py runs/first5-s1-c32b/guide "$ASSETS/guides/output-first5"
pnpguide --threads 1 fit-carry --full-steps 5 --steps 25 --out "$ASSETS/guides/output-first5/correction_carry.json"

# 10. a negative head for output-first5 (stop 29): 16,384 teacher runs of the first 5 steps, each sampling CFG with a
#     negative drawn for it (~14 min), 8,000 steps training the head alone (46 min on 2 CPU threads); then 8,192 runs of
#     the first 8 steps (seed 3, ~12 min) and 3,000 more steps (17.5 min): with a negative the guide runs 8 steps before
#     its correction is carried (negative_first_steps), without one it is output-first5. The carry is the base's.
pnpguide --threads 2 distill --reads unet_output --source trajectories --trajectories 16384 --validation-trajectories 320 \
    --trajectory-first-steps 5 --negative-head --init-guide "$ASSETS/guides/output-first5" --negative-rate 1.0 --seed 2 \
    --loss-weighting timestep --batch-size 64 --learning-rate 5e-4 --lr-warmup-steps 50 --max-steps 8000 --output-dir runs/neghead-s2
pnpguide --threads 2 distill --reads unet_output --source trajectories --trajectories 8192 --validation-trajectories 320 \
    --trajectory-first-steps 8 --negative-head --init-guide runs/neghead-s2/guide --negative-rate 1.0 --seed 3 \
    --loss-weighting timestep --batch-size 64 --learning-rate 3e-4 --lr-warmup-steps 50 --max-steps 3000 --output-dir runs/neghead8-s3
python scripts/ship_guide.py runs/neghead8-s3/guide "$ASSETS/guides/output-first5-neg"
cp "$ASSETS/guides/output-first5/correction_carry.json" "$ASSETS/guides/output-first5-neg/"

# 11. stage 2 rebuilt from output-first5-neg (stop 30): 32 -> 16 -> 8 DDIM steps, true CFG at 32 steps as the first teacher,
#     half the samples with a negative; 1,200 steps of batch 64 a round, 63 min on 2 CPU threads. The students guide every
#     step of their grid (no carry) and keep the negative head. They ship guiding only at t >= 500 (stop 31: below it their
#     guidance cost FID and adherence and added nothing to their fidelity; docs/results/stage2-interval/).
pnpguide --threads 2 distill-steps --guide "$ASSETS/guides/output-first5-neg" --output-dir runs/s2-neg --teacher-steps 32 \
    --student-steps 8 --max-steps 1200 --batch-size 64 --num-samples 20000 --learning-rate 5e-4 --lr-warmup-steps 50 --use-ema \
    --negative-rate 0.5
python scripts/ship_guide.py runs/s2-neg/guide-16 "$ASSETS/guides/output-16step" --default-guidance-interval 500 1000
python scripts/ship_guide.py runs/s2-neg/guide-8 "$ASSETS/guides/output-8step" --default-guidance-interval 500 1000

# 12. the negative head of output-first5-neg trained further (stop 31): 24,576 teacher runs of the first 8 steps with
#     negatives (seed 3: the first 8,192 are step 10's), 4,500 steps at lr 3e-4 from the guide shipped in step 10, 47 min
#     on one thread; only the head moves, so the guide without a negative is still output-first5 bit for bit. The
#     stage-2 students of step 11 were made from step 10's head and are not rebuilt.
pnpguide --threads 2 distill --reads unet_output --source trajectories --trajectories 24576 --validation-trajectories 320 \
    --trajectory-first-steps 8 --negative-head --init-guide "$ASSETS/guides/output-first5-neg" --negative-rate 1.0 --seed 3 \
    --loss-weighting timestep --batch-size 64 --learning-rate 3e-4 --lr-warmup-steps 50 --max-steps 4500 --output-dir runs/neghead8-more
python scripts/ship_guide.py runs/neghead8-more/guide "$ASSETS/guides/output-first5-neg"
cp "$ASSETS/guides/output-first5/correction_carry.json" "$ASSETS/guides/output-first5-neg/"

# 13. a LoRA that teaches the base a new shape, DreamBooth-style: the bar (shapes.NEW_SHAPES, never in the base's data).
#     4,000 rendered flat images that each show a bar, and half of every batch from 2,048 of the base's own samples
#     (25 DDIM steps, w = 1) of its training captions (prior preservation); rank 8 on the attention projections, 1,000
#     steps of batch 32 at lr 5e-4 (11 min of sampling and 22 min of training on one busy core). Shipped as bar-lora.
pnpguide --threads 1 finetune --style flat --method lora --concept bar --prior-images 2048 --num-images 4000 --learning-rate 5e-4 \
    --max-steps 1000 --batch-size 32 --checkpointing-steps 250 --output-dir runs/lora-bar
mkdir -p "$ASSETS/finetunes/bar-lora" && cp runs/lora-bar/lora/pytorch_lora_weights.safetensors "$ASSETS/finetunes/bar-lora/"
