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
