#!/usr/bin/env bash
# Issue 12's guide retraining on one GPU inside a fixed wall-clock budget (the project is lent one for ~10 minutes).
# The embedded UNet is tiny, so one process leaves most of a GPU idle: the runs share it side by side.
# Second call (stop 20): the capacity ladder and the shipping candidates, all guides reading the UNet's features with
# (w - 1) scaling unless named otherwise; stage 1 is MSE at a constant rate, then --loss-weighting timestep, cosine.
#   T   tiny (16, 16, 16 channels on the embedded UNet), stage 1, then 32 -> 16 -> 8 steps   (ship candidate)
#   L   the tiny latent guide D of the first call continued (MSE, cosine), then 32 -> 16 -> 8  (ship candidate)
#   W4  --width-divisor 4 (16, 32, 32), stage 1                                               (capacity ladder)
#   W2  --width-divisor 2 (32, 64, 64), stage 1                                               (capacity ladder)
#   F   the full guide B2 of the first call continued with the timestep loss                  (ship candidate)
# Each phase runs under --max-minutes so training ends by TRAIN_END seconds (packing adds ~50 s); every finished phase is packed
# (guides in fp16, logs, configs) into $OUT/<track>.tgz at once, so a run cut short still returns what it made.
# Usage: OUT=<folder> bash scripts/train_guides_gpu.sh   (knobs below can be overridden from the environment)
# It trains for the embedded base, whose shapes data the mix source draws on (both calls ran on base-te3, the embedded
# base since stop 20). The first call's script (tracks A-E) is at commit c6b041d.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
SETUP=${SETUP:-45}             # seconds a run needs before its loop starts (load, render, encode, teacher trajectories)
PHASE1_END=${PHASE1_END:-190}  # when the first stage-1 phase of T, W4 and W2 ends
PHASE2_END=${PHASE2_END:-290}  # when the stage-1 runs of T and L end (their stage 2 follows)
TRAIN_END=${TRAIN_END:-510}    # when stage 2 and the other stage-1 runs end
BATCH=${BATCH:-256}
NUM_SAMPLES=${NUM_SAMPLES:-20000}
TRAJECTORIES=${TRAJECTORIES:-2048}
PRIOR=${PRIOR:-staging/gpu-guides}  # the first call's guides, continued here
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
    # (a round runs at about the stage-1 rate or faster: stop 20 saw ~3 steps/s against ~2; 0.3x gave 15-second rounds)
    local run=$1 from=$2 rate=$3
    local minutes; minutes=$(python3 -c "print(max(0.05, ($TRAIN_END - $(now) - $SETUP) / 120))")  # two rounds
    pnpguide distill-steps --guide "$from/guide" --teacher-steps 32 --student-steps 8 --batch-size "$BATCH" \
        --num-samples "$NUM_SAMPLES" --learning-rate 5e-4 --lr-warmup-steps 20 --use-ema --log-every 50 \
        --max-steps "$(steps_for "$rate" "$minutes" 1.0)" --max-minutes "$minutes" --checkpointing-steps 100000 \
        --output-dir "$run" >"$run.log" 2>&1
    say "$run: $(ls -d "$run"/guide-* 2>/dev/null | tr '\n' ' ' || echo FAILED)"
}

say "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU')"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"

smoke() {  # a few steps of every path the tracks use, on this device, before the budget is spent on them
    local dir="$RUNS/smoke" small=(--num-samples 256 --trajectories 8 --batch-size 16 --use-ema --max-steps 3)
    pnpguide distill --reads unet_features --scale-by-guidance --source mix --width-divisor 2 --loss-weighting timestep \
        "${small[@]}" --output-dir "$dir/guide-run" >"$dir.distill.log" 2>&1 || return 1
    pnpguide distill --reads latent --source mix --init-guide "$PRIOR/D/guide" "${small[@]}" --output-dir "$dir/latent-run" \
        >"$dir.latent.log" 2>&1 &
    pnpguide distill-steps --guide "$dir/guide-run/guide" --teacher-steps 4 --student-steps 2 "${small[@]}" \
        --output-dir "$dir/steps-run" >"$dir.steps.log" 2>&1 || return 1
    wait $! || return 1
}
mkdir -p "$RUNS/smoke"
if ! smoke; then
    say "smoke test failed:"; for f in "$RUNS"/smoke.*.log; do echo "== $f"; tr '\r' '\n' <"$f" | tail -n 25; done | tee -a "$LOG"; exit 1
fi
say "smoke test passed"; [ -n "${SMOKE_ONLY:-}" ] && exit 0

ladder() {  # ladder <track> <width divisor>: stage 1, two phases, until TRAIN_END
    phase1 "$RUNS/$1-1" --width-divisor "$2"; pack "$1" "$RUNS/$1-1"
    phase2 "$RUNS/$1-2" "$RUNS/$1-1" "$TRAIN_END" timestep --width-divisor "$2"; pack "$1" "logs:$RUNS/$1-1" "$RUNS/$1-2"
}
track_T() {
    phase1 "$RUNS/T1"; pack T "$RUNS/T1"
    phase2 "$RUNS/T2" "$RUNS/T1" "$PHASE2_END" timestep; pack T "$RUNS/T1" "$RUNS/T2"
    stage2 "$RUNS/T3" "$RUNS/T2" "$RUNS/T1"; pack T "$RUNS/T1" "$RUNS/T2" "$RUNS/T3"
}
track_L() {  # as D was trained: no (w - 1) scaling, plain MSE; now decaying to 0 by PHASE2_END (D ran at ~4.9 steps/s)
    local minutes; minutes=$(minutes_until "$PHASE2_END")
    pnpguide distill --reads latent --source mix --batch-size "$BATCH" --num-samples "$NUM_SAMPLES" --trajectories "$TRAJECTORIES" \
        --use-ema --log-every 50 --checkpointing-steps 100000 --checkpoints-total-limit 1 --init-guide "$PRIOR/D/guide" \
        --learning-rate 5e-4 --lr-scheduler cosine --lr-warmup-steps 50 --max-steps "$(python3 -c "print(int(4.2 * $minutes * 60))")" \
        --max-minutes "$minutes" --output-dir "$RUNS/L1" >"$RUNS/L1.log" 2>&1
    say "$RUNS/L1: $(tail -n1 "$RUNS/L1/log.jsonl" 2>/dev/null || echo FAILED)"; pack L "$RUNS/L1"
    stage2 "$RUNS/L2" "$RUNS/L1" "$RUNS/L1"; pack L "$RUNS/L1" "$RUNS/L2"
}
track_F() {  # B ran at ~4.3 steps/s beside four other runs
    local minutes; minutes=$(minutes_until "$TRAIN_END")
    pnpguide distill "${COMMON[@]}" --size full --init-guide "$PRIOR/B2/guide" --loss-weighting timestep --learning-rate 3e-4 \
        --lr-scheduler cosine --lr-warmup-steps 50 --max-steps "$(python3 -c "print(int(3.7 * $minutes * 60))")" \
        --max-minutes "$minutes" --output-dir "$RUNS/F" >"$RUNS/F.log" 2>&1
    say "$RUNS/F: $(tail -n1 "$RUNS/F/log.jsonl" 2>/dev/null || echo FAILED)"; pack F "$RUNS/F"
}

track_T & track_L & ladder W4 4 & ladder W2 2 & track_F &
wait
say "done"
