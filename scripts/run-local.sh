#!/usr/bin/env bash
# The main job on the embedded default (deploy/local.yaml: simulated city, no Kafka), on a fresh
# machine: installs the Python tools (.venv, which carries ONNX Runtime's library for the models),
# builds, and runs. Output in $CITYSTREAM_DATA (default data/): lake/, ground_truth/, privacy/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup-python.sh
# the very build scripts/test.sh makes (same target dir, same command, same features): running
# one after the other never rebuilds
source scripts/target-dir.sh
cargo build --workspace --all-targets --locked
exec "$CARGO_TARGET_DIR/debug/citystream" run --config deploy/local.yaml "$@"
