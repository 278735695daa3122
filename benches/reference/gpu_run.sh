#!/usr/bin/env bash
# One call on a GPU machine: `moppa bench` (candle, CUDA) next to the PyTorch reference on the
# same configurations, alternating, plus a short real training run on the GPU. Never run by CI.
#
#   benches/reference/gpu_run.sh BINARY [OUT_DIR]
#
# BINARY is a `moppa` built with `--no-default-features --features cuda` (see README,
# "Performance"); OUT_DIR (default $OUT, else ./gpu-out) receives gpu.log (everything) and
# gpu.jsonl (one {"label", "rc", "result"} object per timing). The CUDA 13 libraries are looked
# for where the team's GPU machine has them. Each step has its own time limit, so one failure
# leaves the others' numbers. First, `--verify` checks the CUDA kernels and one step of each
# method against the composite reference on the GPU (rc 1 in gpu.jsonl when they disagree).
# QUICK=1 stops after the ViT-B/16 and tiny pairs; PROFILE=1 adds a per-section profile of the
# bf16 MoPPA step (MOPPA_PROFILE_SYNC) to gpu.log.
set -u
BIN=${1:?usage: gpu_run.sh BINARY [OUT_DIR]}
OUT_DIR=${2:-${OUT:-./gpu-out}}
STEPS=${STEPS:-10}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu.log
JSONL=$OUT_DIR/gpu.jsonl
HERE=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, torch.cuda.get_device_name(0))'
    ldd "$BIN" | grep 'not found' && echo "missing libraries (above)"
} 2>&1 | tee -a "$LOG"

# step LABEL LIMIT_S COMMAND...: runs it, appends its JSON line (the command's last stdout line).
step() {
    local label=$1 limit=$2
    shift 2
    echo "== $label: $*" | tee -a "$LOG"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout "$limit" "$@" >"$OUT_DIR/last.txt" 2>>"$LOG"
    rc=$?
    t1=$(date +%s.%N)
    cat "$OUT_DIR/last.txt" | tee -a "$LOG"
    local result
    result=$(tail -n 1 "$OUT_DIR/last.txt")
    case $result in
        \{*) ;;
        *) result=null ;;
    esac
    echo "{\"label\": \"$label\", \"rc\": $rc, \"wall_s\": $(awk "BEGIN{print $t1 - $t0}"), \"result\": $result}" >>"$JSONL"
    echo "   rc $rc" | tee -a "$LOG"
}

B="$BIN bench --device cuda --batch 64 --steps $STEPS --json"
P="$PY $HERE/pytorch_bench.py --device cuda --batch 64 --steps $STEPS --json"

# Warm-up: the driver compiles candle's PTX on first use (~15 s on a fresh machine).
step warmup 120 $BIN bench --device cuda --preset tiny --method moppa --batch 64 --steps 3 --json
step warmup-bf16 60 $BIN bench --device cuda --preset tiny --method moppa --batch 64 --steps 3 --dtype bf16 --json

# Correctness on the GPU: every fused kernel against the CPU loops, and one step's loss and
# gradients against candle's composite primitives (ViT-B/16 at batch 8 keeps it short).
V="$BIN bench --device cuda --steps 1 --verify --json"
step verify-tiny-moppa-f32 60 $V --preset tiny --method moppa --batch 16
step verify-moppa-bf16 90 $V --preset vit-b16 --method moppa --batch 8 --dtype bf16
step verify-lora-bf16 90 $V --preset vit-b16 --method lora --batch 8 --dtype bf16
step verify-full-bf16 90 $V --preset vit-b16 --method full --batch 8 --dtype bf16
step verify-moppa-f32 90 $V --preset vit-b16 --method moppa --batch 8

# The issue's configuration: ViT-B/16, batch 64, MoPPA r8, adapters only.
step candle-moppa-tf32 90 $B --preset vit-b16 --method moppa --tf32
step torch-moppa-tf32 120 $P --preset vit-b16 --method moppa --tf32
step candle-moppa-bf16 90 $B --preset vit-b16 --method moppa --dtype bf16
step torch-moppa-bf16 120 $P --preset vit-b16 --method moppa --dtype bf16
step candle-lora-bf16 90 $B --preset vit-b16 --method lora --dtype bf16
step torch-lora-bf16 120 $P --preset vit-b16 --method lora --dtype bf16
step candle-full-bf16 120 $B --preset vit-b16 --method full --dtype bf16
step torch-full-bf16 120 $P --preset vit-b16 --method full --dtype bf16
step candle-tiny-moppa 60 $B --preset tiny --method moppa
step torch-tiny-moppa 90 $P --preset tiny --method moppa
# A real run end to end on the GPU: the built-in pair, default settings, 300 steps.
RUN=$(mktemp -d)/run
step train-builtin-cuda 150 $BIN train --device cuda --steps 300 --out "$RUN" --plain
tail -n 3 "$RUN/metrics.csv" 2>/dev/null | tee -a "$LOG"
if [ -n "${PROFILE:-}" ]; then
    echo "== profile: vit-b16 moppa bf16, every section synchronised" | tee -a "$LOG"
    MOPPA_PROFILE_SYNC=1 timeout 90 $BIN bench --device cuda --batch 64 --steps 5 --preset vit-b16 --method moppa \
        --dtype bf16 2>&1 | tee -a "$LOG"
fi
if [ -n "${QUICK:-}" ]; then
    date -u | tee -a "$LOG"
    exit 0
fi
# What the lean ops buy on the GPU: the same step on candle's composite primitives only.
step candle-moppa-tf32-composite 90 $B --preset vit-b16 --method moppa --tf32 --kernels composite
step candle-moppa-bf16-composite 90 $B --preset vit-b16 --method moppa --dtype bf16 --kernels composite
# Strict f32 (no TF32) on both sides, and the tiny configuration.
step candle-moppa-f32 90 $B --preset vit-b16 --method moppa
step torch-moppa-f32 120 $P --preset vit-b16 --method moppa

date -u | tee -a "$LOG"
