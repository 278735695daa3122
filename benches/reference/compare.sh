#!/usr/bin/env bash
# Times `moppa bench` (candle) against benches/reference/pytorch_bench.py (eager PyTorch, and the
# same models under torch.compile) on this machine, method by method, rotating the order of the
# three so all see the same machine noise, and prints a markdown table. Never a CI dependency.
#
# Usage: benches/reference/compare.sh [preset] [batch] [steps] [device]
#   preset  tiny (default) | vit-b16     batch  64     steps  10     device  cpu (default) | cuda
# Environment:
#   MOPPA    moppa binary          (default: target/release/moppa in the repository)
#   PYTHON   python with torch+timm (default: python3)
#   METHODS  methods to time       (default: "full moppa lora adaptformer linear")
#   THREADS  CPU threads for both  (default: unset = every usable core, each side's default)
#   DTYPE    f32 (default) | bf16  for both sides (bf16: moppa bench --dtype bf16; PyTorch under
#            torch.autocast(bfloat16); on the CPU both form the linear layers' products in bf16)
#   CANDLE_DTYPE, TORCH_DTYPE  one side's dtype (default: DTYPE), e.g. CANDLE_DTYPE=bf16 alone
#            times candle's bf16 products against f32 PyTorch
#   OMP_WAIT_POLICY  passed through to PyTorch's OpenMP (PASSIVE helps it on a busy machine; see README)
#   COMPILE  1 (default): also time torch.compile (compile time excluded, reported apart); 0: eager only
set -euo pipefail

# the exact command, with the environment variables that were set
cmd=""
for v in MOPPA PYTHON METHODS THREADS DTYPE CANDLE_DTYPE TORCH_DTYPE OMP_WAIT_POLICY COMPILE; do
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
CANDLE_DTYPE="${CANDLE_DTYPE:-$DTYPE}"
TORCH_DTYPE="${TORCH_DTYPE:-$DTYPE}"
THREADS="${THREADS:-}"
COMPILE="${COMPILE:-1}"

if [ ! -x "$MOPPA" ]; then
    echo "error: moppa binary not found at $MOPPA (build it with cargo build --release, or set MOPPA)" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import torch, timm' 2>/dev/null; then
    echo "error: $PYTHON cannot import torch and timm (set PYTHON to a venv's python)" >&2
    exit 2
fi

common=(--preset "$preset" --batch "$batch" --steps "$steps" --device "$device" --json)
if [ -n "$THREADS" ]; then common+=(--threads "$THREADS"); fi

# get KEY JSON: one field of a JSON object
get() {
    if command -v jq >/dev/null 2>&1; then
        printf '%s' "$2" | jq -r ".$1"
    else
        printf '%s' "$2" | "$PYTHON" -c 'import json, sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"
    fi
}

# run_one candle|pytorch|compiled METHOD: prints the JSON line, or nothing on failure
run_one() {
    local out
    case "$1" in
    candle) out="$("$MOPPA" bench --method "$2" --dtype "$CANDLE_DTYPE" "${common[@]}" 2>"$tmp/err")" || { sed 's/^/  candle: /' "$tmp/err" >&2; return 0; } ;;
    pytorch) out="$("$PYTHON" "$here/pytorch_bench.py" --method "$2" --dtype "$TORCH_DTYPE" "${common[@]}" 2>"$tmp/err")" || { sed 's/^/  pytorch: /' "$tmp/err" >&2; return 0; } ;;
    compiled) out="$("$PYTHON" "$here/pytorch_bench.py" --compile --method "$2" --dtype "$TORCH_DTYPE" "${common[@]}" 2>"$tmp/err")" || { sed 's/^/  compiled: /' "$tmp/err" >&2; return 0; } ;;
    esac
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
    # rotate which side goes first, so none always runs on the warmer (or busier) machine
    sides=(candle pytorch)
    if [ "$COMPILE" = 1 ]; then sides+=(compiled); fi
    n=${#sides[@]}
    c=""; p=""; q=""
    for k in $(seq 0 $((n - 1))); do
        side="${sides[$(((i + k) % n))]}"
        out="$(run_one "$side" "$m")"
        case "$side" in candle) c="$out" ;; pytorch) p="$out" ;; compiled) q="$out" ;; esac
    done
    i=$((i + 1))
    label="$m"; cs="failed"; ps="failed"; qs="failed"; qc="-"; ratio="-"; qratio="-"
    if [ "$COMPILE" != 1 ]; then qs="-"; fi
    if [ -n "$c" ]; then
        raw+=("candle:   $c")
        label="$(get method "$c")"
        cs="$(get step_ms "$c")"
    fi
    if [ -n "$p" ]; then
        raw+=("pytorch:  $p")
        label="$(get method "$p")"
        ps="$(get step_ms "$p")"
    fi
    if [ -n "$q" ]; then
        raw+=("compiled: $q")
        qs="$(get step_ms "$q")"; qc="$(get compile_s "$q")"
    fi
    if [ "$cs" != failed ] && [ "$ps" != failed ]; then
        ratio="$(awk -v a="$cs" -v b="$ps" 'BEGIN { printf "%.2f", a / b }')"
    fi
    if [ "$cs" != failed ] && [ "$qs" != failed ] && [ "$qs" != - ]; then
        qratio="$(awk -v a="$cs" -v b="$qs" 'BEGIN { printf "%.2f", a / b }')"
    fi
    rows+=("| $label | $(fmt "$cs") | $(fmt "$ps") | $(fmt "$qs") | $ratio | $qratio | $(fmt "$qc") |")
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
if [ "$CANDLE_DTYPE" = "$TORCH_DTYPE" ]; then dtypes="$CANDLE_DTYPE"; else dtypes="candle $CANDLE_DTYPE, PyTorch $TORCH_DTYPE"; fi
echo "### moppa bench vs PyTorch: $preset, batch $batch, $steps timed steps, $device, $dtypes, $threads_used threads"
echo
echo "| method | candle step ms | eager step ms | compiled step ms | candle/eager | candle/compiled | compile s |"
echo "|---|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
echo
echo "- machine: $machine"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- command: \`$cmd\`"
echo "- candle: \`$MOPPA\` (git $rev); PyTorch: $torchv, eager and torch.compile (inductor, default mode), \`$PYTHON\`"
echo "- medians over the timed steps after 3 warm-up steps; ratio < 1 means candle is faster; compile s: the first, compiling step of torch.compile (forward and backward), not in its step time"
echo
echo "<details><summary>raw JSON</summary>"
echo
echo '```'
printf '%s\n' "${raw[@]}"
echo '```'
echo "</details>"
