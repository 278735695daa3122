#!/usr/bin/env bash
# Times `moppa bench` (candle) against benches/reference/pytorch_bench.py (eager PyTorch) on this
# machine, method by method, alternating the two so both see the same machine noise, and prints a
# markdown table. Never a CI dependency.
#
# Usage: benches/reference/compare.sh [preset] [batch] [steps] [device]
#   preset  tiny (default) | vit-b16     batch  64     steps  10     device  cpu (default) | cuda
# Environment:
#   MOPPA    moppa binary          (default: target/release/moppa in the repository)
#   PYTHON   python with torch+timm (default: python3)
#   METHODS  methods to time       (default: "full moppa lora adaptformer linear")
#   THREADS  CPU threads for both  (default: unset = every usable core, each side's default)
#   DTYPE    f32 (default) | bf16  (bf16 only has an effect on cuda, on both sides)
#   OMP_WAIT_POLICY  passed through to PyTorch's OpenMP (PASSIVE helps it on a busy machine; see README)
set -euo pipefail

# the exact command, with the environment variables that were set
cmd=""
for v in MOPPA PYTHON METHODS THREADS DTYPE OMP_WAIT_POLICY; do
    if [ -n "${!v:-}" ]; then cmd+="$v='${!v}' "; fi
done
cmd+="benches/reference/compare.sh${*:+ $*}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
preset="${1:-tiny}"
batch="${2:-64}"
steps="${3:-10}"
device="${4:-cpu}"
MOPPA="${MOPPA:-$root/target/release/moppa}"
PYTHON="${PYTHON:-python3}"
METHODS="${METHODS:-full moppa lora adaptformer linear}"
DTYPE="${DTYPE:-f32}"
THREADS="${THREADS:-}"

if [ ! -x "$MOPPA" ]; then
    echo "error: moppa binary not found at $MOPPA (build it with cargo build --release, or set MOPPA)" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import torch, timm' 2>/dev/null; then
    echo "error: $PYTHON cannot import torch and timm (set PYTHON to a venv's python)" >&2
    exit 2
fi

common=(--preset "$preset" --batch "$batch" --steps "$steps" --device "$device" --dtype "$DTYPE" --json)
if [ -n "$THREADS" ]; then common+=(--threads "$THREADS"); fi

# get KEY JSON: one field of a JSON object
get() {
    if command -v jq >/dev/null 2>&1; then
        printf '%s' "$2" | jq -r ".$1"
    else
        printf '%s' "$2" | "$PYTHON" -c 'import json, sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"
    fi
}

# run_one candle|pytorch METHOD: prints the JSON line, or nothing on failure
run_one() {
    local out
    if [ "$1" = candle ]; then
        out="$("$MOPPA" bench --method "$2" "${common[@]}" 2>"$tmp/err")" || { sed 's/^/  candle: /' "$tmp/err" >&2; return 0; }
    else
        out="$("$PYTHON" "$here/pytorch_bench.py" --method "$2" "${common[@]}" 2>"$tmp/err")" || { sed 's/^/  pytorch: /' "$tmp/err" >&2; return 0; }
    fi
    printf '%s\n' "$out" | grep '^{' | tail -n 1
}

fmt() { case "$1" in failed | -) printf '%s' "$1" ;; *) awk -v x="$1" 'BEGIN { printf "%.1f", x }' ;; esac; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

rows=()
raw=()
i=0
for m in $METHODS; do
    echo "timing $m ..." >&2
    # alternate which side goes first, so neither always runs on the warmer (or busier) machine
    if [ $((i % 2)) -eq 0 ]; then
        c="$(run_one candle "$m")"; p="$(run_one pytorch "$m")"
    else
        p="$(run_one pytorch "$m")"; c="$(run_one candle "$m")"
    fi
    i=$((i + 1))
    label="$m"; cs="failed"; ps="failed"; ci="-"; pi="-"; ratio="-"
    if [ -n "$c" ]; then
        raw+=("candle:  $c")
        label="$(get method "$c")"
        cs="$(get step_ms "$c")"; ci="$(get img_per_s "$c")"
    fi
    if [ -n "$p" ]; then
        raw+=("pytorch: $p")
        label="$(get method "$p")"
        ps="$(get step_ms "$p")"; pi="$(get img_per_s "$p")"
    fi
    if [ "$cs" != failed ] && [ "$ps" != failed ]; then
        ratio="$(awk -v a="$cs" -v b="$ps" 'BEGIN { printf "%.2f", a / b }')"
    fi
    rows+=("| $label | $(fmt "$cs") | $(fmt "$ps") | $ratio | $(fmt "$ci") | $(fmt "$pi") |")
done

cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')"
[ -n "$cpu" ] || cpu="$(uname -m)"
machine="$(nproc) CPUs, $cpu"
if [ "$device" = cuda ] && command -v nvidia-smi >/dev/null 2>&1; then
    machine="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1); host: $machine"
fi
torchv="$("$PYTHON" -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")')"
rev="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then rev="$rev (dirty)"; fi
threads_used="$(if [ -n "${c:-}" ]; then get threads "$c"; elif [ -n "${p:-}" ]; then get threads "$p"; else echo '?'; fi)"

echo
echo "### moppa bench vs PyTorch: $preset, batch $batch, $steps timed steps, $device, $DTYPE, $threads_used threads"
echo
echo "| method | candle step ms | PyTorch step ms | ratio (candle/PyTorch) | candle img/s | PyTorch img/s |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
echo
echo "- machine: $machine"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- command: \`$cmd\`"
echo "- candle: \`$MOPPA\` (git $rev); PyTorch: $torchv, eager, \`$PYTHON\`"
echo "- medians over the timed steps after 3 warm-up steps; ratio < 1 means candle is faster"
echo
echo "<details><summary>raw JSON</summary>"
echo
echo '```'
printf '%s\n' "${raw[@]}"
echo '```'
echo "</details>"
