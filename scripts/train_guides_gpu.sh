#!/usr/bin/env bash
# Issue 12's guide retraining on one GPU inside a fixed wall-clock budget (the project is lent one for ~10 minutes).
# The embedded UNet is tiny, so one process leaves most of a GPU idle: five runs share it side by side.
#   A  tiny feature guide: MSE, then per-timestep normalised loss (--loss-weighting timestep), then 32 -> 16 -> 8 steps
#   B  full feature guide: the same two stage-1 phases
#   C  tiny feature guide that reads negative prompts (issue 15): the same two phases, then 32 -> 16 -> 8 steps
#   D  tiny latent guide (the paper's design, as shipped before): MSE for the whole budget (does a long run fix it?)
#   E  A after its first phase, continued with plain MSE instead (the loss ablation at equal steps)
# Each phase runs under --max-minutes so the whole script ends by DEADLINE seconds; every finished phase is packed
# (guides in fp16, logs, configs) into $OUT/<track>.tgz at once, so a run cut short still returns what it made.
# Usage: OUT=<folder> bash scripts/train_guides_gpu.sh   (knobs below can be overridden from the environment)
# It trains for the embedded base, whose shapes data the mix source draws on. The guides in staging/gpu-guides/ were
# made for base-te3 after `python scripts/ship_base.py staging/base-te3` had copied it into the package.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DEADLINE=${DEADLINE:-575}      # seconds from START by which everything, packing included, is done
SETUP=${SETUP:-45}             # seconds a run needs before its loop starts (load, render, encode, teacher trajectories)
PHASE1_END=${PHASE1_END:-230}  # when the first stage-1 phase of every track ends
PHASE2_END=${PHASE2_END:-370}  # when the second phase of A and C ends (B, D and E run to TRAIN_END)
TRAIN_END=${TRAIN_END:-470}    # when stage 2 and the long runs end; the evaluation runs after it
BATCH=${BATCH:-256}
NUM_SAMPLES=${NUM_SAMPLES:-20000}
TRAJECTORIES=${TRAJECTORIES:-2048}
EVAL_IMAGES=${EVAL_IMAGES:-48}
RUNS=${RUNS:-runs/gpu}
OUT=${OUT:-$RUNS/out}
mkdir -p "$RUNS" "$OUT"
LOG="$OUT/log.txt"

now() { echo $(( $(date +%s) - START )); }
say() { echo "[$(now) s] $*" | tee -a "$LOG"; }
minutes_until() {  # minutes of loop left if a run starting now ends at second $1 (at least 0.05)
    python3 -c "print(max(0.05, ($1 - $(now) - $SETUP) / 60))"
}
steps_for() {  # steps a run of $2 minutes makes at the rate of the run in $1 (its log.jsonl), times $3
    python3 - "$1/log.jsonl" "$2" "$3" <<'EOF'
import json, sys
try:
    lines = [json.loads(l) for l in open(sys.argv[1])]
except OSError:  # that run failed: a guess, --max-minutes still ends the run in time
    lines = [{"step": 20, "elapsed_s": 1.0}]
rate = lines[-1]["step"] / max(lines[-1]["elapsed_s"], 1e-3)
print(max(20, int(rate * float(sys.argv[2]) * 60 * float(sys.argv[3]))))
EOF
}
pack() {  # pack <track> <run folder>...: fp16 copies of the guides, logs and configs (a run given as logs:<folder>: no guides)
    local track=$1; shift
    local staging="$RUNS/pack-$track"
    rm -rf "$staging"; mkdir -p "$staging"
    for entry in "$@"; do
        local run=${entry#logs:} name; name=$(basename "$run")
        mkdir -p "$staging/$name"
        cp "$run"/config.json "$run"/log.jsonl "$staging/$name/" 2>/dev/null
        tr '\r' '\n' <"$run.log" | grep -v '^\s*$' | tail -n 200 >"$staging/$name.log" 2>/dev/null
        [ "$entry" != "$run" ] && continue
        for guide in "$run"/guide "$run"/guide-*; do
            [ -f "$guide/config.json" ] && python3 scripts/ship_guide.py "$guide" "$staging/$name/$(basename "$guide")" >/dev/null
        done
    done
    tar czf "$OUT/$track.tgz" -C "$staging" . && say "packed $track: $(du -h "$OUT/$track.tgz" | cut -f1)"
}

COMMON=(--reads unet_features --scale-by-guidance --source mix --batch-size "$BATCH" --num-samples "$NUM_SAMPLES"
        --trajectories "$TRAJECTORIES" --use-ema --log-every 50 --checkpointing-steps 100000 --checkpoints-total-limit 1)

phase1() {  # phase1 <run> <extra flags>...: MSE at a constant learning rate until PHASE1_END
    local run=$1; shift
    pnpguide distill "${COMMON[@]}" "$@" --learning-rate 1e-3 --lr-scheduler constant_with_warmup --lr-warmup-steps 100 \
        --max-steps 1000000 --max-minutes "$(minutes_until "$PHASE1_END")" --output-dir "$run" >"$run.log" 2>&1
    say "$run: $(tail -n1 "$run/log.jsonl" 2>/dev/null || echo FAILED)"
}
phase2() {  # phase2 <run> <from> <end> <loss> <extra flags>...: continued from <from>, lr 3e-4 decaying to 0 by <end>
    local run=$1 from=$2 end=$3 loss=$4; shift 4
    local minutes; minutes=$(minutes_until "$end")
    pnpguide distill "${COMMON[@]}" "$@" --init-guide "$from/guide" --loss-weighting "$loss" --learning-rate 3e-4 \
        --lr-scheduler cosine --lr-warmup-steps 50 --max-steps "$(steps_for "$from" "$minutes" 0.9)" --max-minutes "$minutes" \
        --output-dir "$run" >"$run.log" 2>&1
    say "$run: $(tail -n1 "$run/log.jsonl" 2>/dev/null || echo FAILED)"
}
stage2() {  # stage2 <run> <stage-1 run> <rate run>: 32 -> 16 -> 8 steps until TRAIN_END, true CFG as the first teacher
    local run=$1 from=$2 rate=$3
    local minutes; minutes=$(python3 -c "print(max(0.05, ($TRAIN_END - $(now) - $SETUP) / 120))")  # two rounds
    pnpguide distill-steps --guide "$from/guide" --teacher-steps 32 --student-steps 8 --batch-size "$BATCH" \
        --num-samples "$NUM_SAMPLES" --learning-rate 5e-4 --lr-warmup-steps 20 --use-ema --log-every 50 \
        --max-steps "$(steps_for "$rate" "$minutes" 0.3)" --max-minutes "$minutes" --checkpointing-steps 100000 \
        --output-dir "$run" >"$run.log" 2>&1
    say "$run: $(ls -d "$run"/guide-* 2>/dev/null | tr '\n' ' ' || echo FAILED)"
}

say "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU')"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"

smoke() {  # a few steps of every path the tracks use, on this device, before the budget is spent on them
    local dir="$RUNS/smoke" small=(--num-samples 256 --trajectories 8 --batch-size 16 --use-ema --max-steps 3)
    pnpguide distill --reads unet_features --scale-by-guidance --source mix --negatives --loss-weighting timestep "${small[@]}" \
        --output-dir "$dir/guide-run" >"$dir.distill.log" 2>&1 || return 1
    pnpguide distill-steps --guide "$dir/guide-run/guide" --teacher-steps 4 --student-steps 2 "${small[@]}" \
        --output-dir "$dir/steps-run" >"$dir.steps.log" 2>&1 &
    pnpguide eval --guide "$dir/guide-run/guide" --scales 3 --steps 4 --images 2 --no-speed --grid-prompts 0 \
        --out-dir "$dir/eval" >"$dir.eval.log" 2>&1 || return 1
    wait $! || return 1
}
mkdir -p "$RUNS/smoke"
if ! smoke; then
    say "smoke test failed:"; for f in "$RUNS"/smoke.*.log; do echo "== $f"; tr '\r' '\n' <"$f" | tail -n 25; done | tee -a "$LOG"; exit 1
fi
say "smoke test passed"; [ -n "${SMOKE_ONLY:-}" ] && exit 0

track_A() {
    phase1 "$RUNS/A1"; pack A "$RUNS/A1"
    track_E &  # E starts from A's first phase
    phase2 "$RUNS/A2" "$RUNS/A1" "$PHASE2_END" timestep; pack A "$RUNS/A1" "$RUNS/A2"
    stage2 "$RUNS/A3" "$RUNS/A2" "$RUNS/A1"; pack A "$RUNS/A1" "$RUNS/A2" "$RUNS/A3"
    wait
}
track_B() { phase1 "$RUNS/B1" --size full; pack B "$RUNS/B1"; phase2 "$RUNS/B2" "$RUNS/B1" "$TRAIN_END" timestep --size full
    [ -f "$RUNS/B2/guide/config.json" ] && pack B "logs:$RUNS/B1" "$RUNS/B2"; }  # two full guides would pass the 16 MiB a file
track_C() {
    phase1 "$RUNS/C1" --negatives; pack C "$RUNS/C1"
    phase2 "$RUNS/C2" "$RUNS/C1" "$PHASE2_END" timestep --negatives; pack C "$RUNS/C1" "$RUNS/C2"
    stage2 "$RUNS/C3" "$RUNS/C2" "$RUNS/C1"; pack C "$RUNS/C1" "$RUNS/C2" "$RUNS/C3"
}
track_D() {  # the latent guide, plain MSE, constant lr for the whole budget (no scaling by w - 1, as shipped)
    pnpguide distill --reads latent --source mix --batch-size "$BATCH" --num-samples "$NUM_SAMPLES" --trajectories "$TRAJECTORIES" \
        --use-ema --log-every 50 --checkpointing-steps 100000 --checkpoints-total-limit 1 --learning-rate 1e-3 \
        --lr-scheduler constant_with_warmup --lr-warmup-steps 100 --max-steps 1000000 --max-minutes "$(minutes_until "$TRAIN_END")" \
        --output-dir "$RUNS/D" >"$RUNS/D.log" 2>&1
    say "$RUNS/D: $(tail -n1 "$RUNS/D/log.jsonl" 2>/dev/null || echo FAILED)"; pack D "$RUNS/D"
}
track_E() { phase2 "$RUNS/E2" "$RUNS/A1" "$TRAIN_END" none; pack E "$RUNS/E2"; }

track_A & track_B & track_C & track_D &
wait
say "training done"

# Fidelity to CFG of every stage-1 guide at w = 3, 5, 7.5 (25 steps), on the GPU, until DEADLINE
guides=()
for run in A2 B2 C2 D E2; do [ -f "$RUNS/$run/guide/config.json" ] && guides+=("$RUNS/$run/guide"); done
if [ ${#guides[@]} -gt 0 ]; then
    timeout $(( DEADLINE - $(now) - 10 )) pnpguide eval --guide "${guides[@]}" --scales 3 5 7.5 --steps 25 --images "$EVAL_IMAGES" \
        --no-speed --grid-prompts 0 --out-dir "$RUNS/eval" >"$RUNS/eval.log" 2>&1
    say "eval exit $?"
    tar czf "$OUT/eval.tgz" -C "$RUNS" eval eval.log A1.log A2.log A3.log B1.log B2.log C1.log C2.log C3.log D.log E2.log 2>/dev/null
fi
say "done"
