#!/usr/bin/env bash
# The checks CI runs besides the tests (see .ci/run); run it locally before pushing.
# Clippy runs with --release so build scripts and proc-macros are shared with `cargo test --release`.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== rustfmt"
cargo fmt --all -- --check

echo "== clippy (default features: engine + CLI + app)"
cargo clippy --release --all-targets -- -D warnings

echo "== clippy (--no-default-features: headless engine + CLI)"
cargo clippy --release --all-targets --no-default-features -- -D warnings

echo "== layering: the headless build must not depend on GUI crates"
forbidden='^(egui|eframe|egui_plot|egui-wgpu|egui-winit|egui_glow|rfd|winit|wgpu) v'
if cargo tree --no-default-features -e normal --prefix none | grep -E "$forbidden" | sort -u; then
    echo "error: the crates above are GUI dependencies reachable without the gui feature" >&2
    exit 1
fi
echo "ok"

echo "== layering: who may name whom (../shared/ARCHITECTURE.md)"
fail=0
layer_rule() { # pattern, folder, message
    if hits=$(grep -rnE "$1" "$2" --include='*.rs'); then
        echo "$hits" >&2
        echo "error: $3" >&2
        fail=1
    fi
}
layer_rule 'crate::app\b' src/cli "the CLI names the app (the two faces are siblings; main.rs builds the app's options)"
layer_rule 'crate::model\b' src/app "the app names the model (it reads train and config only)"
layer_rule 'candle_core|candle_nn' src/app "the app names candle (it never touches a tensor)"
layer_rule 'pub use crate::model\b' src/train "train re-exports the model (displays see protocol and config types only)"
layer_rule 'softplus' src/physics "physics names softplus (the model owns the coefficients' parameterisation)"
layer_rule 'softplus' src/train "train names the softplus helpers (the model owns the coefficients' parameterisation)"
layer_rule 'crate::(model|physics|data|train|cli|app)\b' src/config "config names a higher layer (it is plain data at the bottom)"
[ "$fail" -eq 0 ] || exit 1
echo "ok"
