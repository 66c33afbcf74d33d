#!/usr/bin/env bash
# Rebuild every shipped asset of the embedded default model from scratch, in order, with the current commands.
# Times are those measured on a 2-core CPU unless said otherwise (docs/embedded-model.md); the paper guide was trained on
# one GPU (add --max-minutes to bound any run). Every run writes runs/<name>/{config.json,log.jsonl} and can be resumed with
# --resume latest. Weights differ bit for bit from the shipped ones where the training code has changed since (the loss of
# an output guide is now in units of cond - uncond), but the recipe is the one that made them.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=src/pnpguide/assets

# 1. VAE, 64x64x3 <-> 16x16x4, on all four styles (~10 min)
pnpguide --threads 2 embedded train-vae --output-dir runs/vae --max-steps 1200 --checkpointing-steps 250

# 2. text-to-image UNet on cached latents, v-prediction, 10% empty captions, EMA (~55 min); then the text encoder (MiniLM)
#    cut to its first 3 layers and 2,000 more UNet steps (~2 h on one core)
pnpguide --threads 2 embedded train-base --vae-dir runs/vae/vae --output-dir runs/base --max-steps 4500
python -c "from pnpguide.loading import load_pipeline, save_pipeline; p = load_pipeline('runs/base/pipeline'); e = p.text_encoder; e.encoder.layer = e.encoder.layer[:3]; e.config.num_hidden_layers = 3; save_pipeline(p, 'runs/te3/init')"
pnpguide --threads 1 embedded finetune --base runs/te3/init --style flat --method full --learning-rate 3e-4 --lr-warmup-steps 100 \
    --max-steps 2000 --batch-size 64 --num-images 40000 --use-ema --seed 5 --checkpointing-steps 400 --output-dir runs/te3/ft
python scripts/ship_base.py runs/te3/ft/pipeline

# 3. fine-tunes to plug guides into: a full UNet fine-tune (pastel style) and a LoRA (outline style)
pnpguide --threads 1 embedded finetune --base "$ASSETS/base" --style pastel --method full --output-dir runs/ft-pastel --max-steps 400 --batch-size 32
pnpguide --threads 1 embedded finetune --base "$ASSETS/base" --style outline --method lora --learning-rate 1e-3 --output-dir runs/lora-outline --max-steps 400 --batch-size 32
python scripts/ship_finetunes.py runs/ft-pastel/pipeline runs/lora-outline/lora

# 4. the FID feature network for `pnpguide eval` (~22 min on one core)
pnpguide --threads 1 embedded train-features --output-dir runs/features --max-steps 3000
python scripts/ship_features.py runs/features/features "$ASSETS/features/shapes"

# 5. the paper guide (the residual design), on one GPU: batch 256, noised dataset latents and CFG teacher trajectories
#    mixed, EMA; 1,749 steps at a constant rate, then 772 with a cosine decay
GPU=(--design residual --source mix --batch-size 256 --num-samples 20000 --trajectories 2048 --use-ema --loss-weighting none --log-every 50)
pnpguide distill "${GPU[@]}" --learning-rate 1e-3 --lr-scheduler constant_with_warmup --lr-warmup-steps 100 --max-steps 1749 --output-dir runs/paper-1
pnpguide distill "${GPU[@]}" --init-guide runs/paper-1/guide --learning-rate 5e-4 --lr-scheduler cosine --lr-warmup-steps 50 \
    --max-steps 772 --output-dir runs/paper
python scripts/ship_guide.py runs/paper/guide paper --measured scripts/cards/paper.md

# 6. the default guide: an output guide on the teacher's first 5 of 25 steps (the recipe `pnpguide distill` defaults to),
#    trained in four runs on 1,536, 8,192 and twice 32,768 stored teacher trajectories, 27,000 steps of batch 64 in all
#    (~4 h on 2 CPU threads); the correction carry is fitted on the base and saved with each guide
FIRST=(--trajectory-first-steps 5 --batch-size 64 --lr-warmup-steps 50)
pnpguide --threads 2 distill "${FIRST[@]}" --trajectories 1536 --learning-rate 1e-3 --max-steps 1500 --output-dir runs/first5-a
pnpguide --threads 2 distill "${FIRST[@]}" --trajectories 8192 --learning-rate 1e-3 --max-steps 9000 --init-guide runs/first5-a/guide --output-dir runs/first5-b
pnpguide --threads 2 distill "${FIRST[@]}" --trajectories 32768 --learning-rate 5e-4 --max-steps 7500 --init-guide runs/first5-b/guide \
    --validation-trajectories 320 --output-dir runs/first5-c
pnpguide --threads 1 distill "${FIRST[@]}" --trajectories 32768 --learning-rate 3e-4 --max-steps 9000 --seed 1 --init-guide runs/first5-c/guide \
    --validation-trajectories 320 --output-dir runs/first5
#    its negative head, trained alone on teacher runs that each sample CFG with a negative drawn for them: the first 5 steps
#    of 16,384 runs, then the first 8 steps of 24,576 (with a negative the guide runs 8 steps before carrying); ~2 h
NEG=(--negative-head --negative-rate 1.0 --batch-size 64 --lr-warmup-steps 50 --validation-trajectories 320)
pnpguide --threads 2 distill "${NEG[@]}" --trajectories 16384 --trajectory-first-steps 5 --seed 2 --learning-rate 5e-4 --max-steps 8000 \
    --init-guide runs/first5/guide --output-dir runs/first5-neg5
pnpguide --threads 2 distill "${NEG[@]}" --trajectories 24576 --trajectory-first-steps 8 --seed 3 --learning-rate 3e-4 --max-steps 7500 \
    --init-guide runs/first5-neg5/guide --output-dir runs/first5-neg
#    its step heads: steps 0, 1 and 4 (t = 999, 959, 839) each get a copy of the prompt's head, trained alone on the
#    teacher's states at its step, 2,500 steps of batch 144 (~50 min on 2 CPU threads with the teacher runs): the first
#    step's correction is the largest, the second's error costs the image as much, the last one's is carried to the end
#    (docs/findings.md, "Where the image gap is lost"). Its runs draw each kind of caption at its share of the scenes; the
#    runs above drew from the distinct captions (one-object prompts 5% of them) when the shipped guide was made
pnpguide --threads 2 distill --init-guide runs/first5-neg/guide --step-heads 0 1 4 --trajectories 16384 --seed 4 --learning-rate 3e-4 \
    --max-steps 2500 --batch-size 144 --output-dir runs/first5-heads
python scripts/ship_guide.py runs/first5-heads/guide default --measured scripts/cards/default.md

# 7. the few-step guides (docs/results/few-step/command.txt).
#  7a. the uniform 16-step student, not shipped, the grid students' starting point: stage 2 from the default guide,
#      32 -> 16 -> 8 DDIM steps, true CFG at 32 steps as the first teacher, half the samples with a negative; 1,200 steps
#      of batch 64 a round (63 min on 2 CPU threads)
pnpguide --threads 2 distill-steps --guide runs/first5-neg5/guide --output-dir runs/steps --teacher-steps 32 --student-steps 8 \
    --max-steps 1200 --batch-size 64 --num-samples 20000 --learning-rate 5e-4 --lr-warmup-steps 50 --use-ema --negative-rate 0.5
#  7b. the 8-step guide, a grid student: grid 999 939 879 819 759 639 | 499 259 on the 50-step DDIM grid, each segment
#      learnt from 2,048 runs of true CFG at 50 steps over shapes captions (half with a negative; written once into
#      runs/teacher-runs-50 and shared, ~64 min on one thread); without a negative prompt it guides only at t >= 500
#      (--unguided-below 500), its two segments below are learnt on the runs with a negative. 1,200 steps of batch 64 with
#      EMA in two runs: g8, every segment alike (24 min), then g8b from it, the first segment drawn 4x and the second 2x,
#      where the image error was (20 min)
GRID8=(--teacher-steps 50 --student-timesteps 999 939 879 819 759 639 499 259 --unguided-below 500 --teacher-runs runs/teacher-runs-50
       --trajectories 2048 --num-samples 20000 --negative-rate 0.5 --max-steps 1200 --batch-size 64 --use-ema --log-every 25
       --checkpointing-steps 200)
pnpguide --threads 1 distill-steps "${GRID8[@]}" --guide runs/steps/guide-16 --output-dir runs/g8 --learning-rate 3e-4 \
    --lr-warmup-steps 50 --max-minutes 75
pnpguide --threads 1 distill-steps "${GRID8[@]}" --guide runs/g8/guide-8 --output-dir runs/g8b --segment-repeats 4 2 1 1 1 1 1 1 \
    --learning-rate 2e-4 --lr-warmup-steps 20 --max-minutes 40
python scripts/ship_guide.py runs/g8b/guide-8 8-step --measured scripts/cards/8-step.md
#  7c. the 4-step guide from it: grid 999 939 799 | 499 (guided at the first three, one plain step from 499 to the end),
#      the first segment drawn 2x, on the same teacher runs
pnpguide --threads 1 distill-steps --guide runs/g8b/guide-8 --output-dir runs/g4 --teacher-steps 50 --student-timesteps 999 939 799 499 \
    --unguided-below 500 --segment-repeats 2 1 1 1 --teacher-runs runs/teacher-runs-50 --trajectories 2048 --num-samples 20000 \
    --negative-rate 0.5 --max-steps 1200 --batch-size 64 --learning-rate 3e-4 --lr-warmup-steps 20 --use-ema --log-every 25 \
    --checkpointing-steps 200 --max-minutes 30
python scripts/ship_guide.py runs/g4/guide-4 4-step --measured scripts/cards/4-step.md

# 8. a LoRA that teaches the base a new shape, DreamBooth-style: the bar (shapes.NEW_SHAPES, never in the base's data).
#    4,000 rendered flat images that each show a bar, and half of every batch from 2,048 of the base's own samples
#    (25 DDIM steps, w = 1) of its training captions (prior preservation); rank 8 on the attention projections, 1,000
#    steps of batch 32 at lr 5e-4 (11 min of sampling and 22 min of training on one busy core). Shipped as bar-lora.
pnpguide --threads 1 embedded finetune --style flat --method lora --concept bar --prior-images 2048 --num-images 4000 --learning-rate 5e-4 \
    --max-steps 1000 --batch-size 32 --checkpointing-steps 250 --output-dir runs/lora-bar
mkdir -p "$ASSETS/finetunes/bar-lora" && cp runs/lora-bar/lora/pytorch_lora_weights.safetensors "$ASSETS/finetunes/bar-lora/"
