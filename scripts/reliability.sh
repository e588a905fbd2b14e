#!/usr/bin/env bash
# The long versions of the reliability suite (README, "Reliability"); CI runs the short
# ones. Usage: bash scripts/reliability.sh [crash|faults|load|fuzz|byzantine|compression|all]
# (default all; several hours on 2 cores, mostly the Byzantine matrix and the fuzzing).
# Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/covey/target}"
what="${1:-all}"
run() { [ "$what" = all ] || [ "$what" = "$1" ]; }

if run crash; then
  echo "== crash: SIGKILL at 20 seeded points, 50 agents"
  COVEY_CRASH_POINTS=20 cargo test -q -p covey-coordinator-cli --test process crash -- --nocapture 2>&1 |
    grep -E "crash (plan|suite)|test result"
fi

if run faults; then
  echo "== network faults: 10 seeds through the fault-injecting proxy"
  for seed in 1 2 3 4 5 6 7 8 9 10; do
    COVEY_FAULT_SEED=$seed cargo test -q -p covey-tests --test network_faults -- --nocapture 2>&1 |
      grep -E "network faults|test result"
  done
fi

if run load; then
  echo "== load: 1,000 agents, 5 rounds"
  cargo bench -q -p covey-coordinator-cli --bench load -- 1000 5
fi

if run fuzz; then
  echo "== fuzz: 10^6 executions of every target (nightly cargo-fuzz)"
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
  cd fuzz
  for target in $(cargo +nightly fuzz list); do
    start=$(date +%s)
    cargo +nightly fuzz run -O "$target" "corpus/$target" -- -runs=1000000 -timeout=10 -print_final_stats=1 \
      >"/tmp/covey-fuzz-$target.log" 2>&1 || { tail -n 40 "/tmp/covey-fuzz-$target.log"; exit 1; }
    echo "$target: $(grep -o 'stat::number_of_executed_units: *[0-9]*' "/tmp/covey-fuzz-$target.log" | grep -o '[0-9]*$') executions, 0 crashes, $(( $(date +%s) - start )) s"
  done
  cd ..
fi

if run byzantine || run compression; then
  # The dev profile, as the README's figures (dependencies and the model crates at opt-level 3).
  cargo build -q -p covey-sim-cli
  sim="$CARGO_TARGET_DIR/debug/covey-sim"
fi

if run byzantine; then
  echo "== Byzantine matrix: 6 strategies × 5 attacks × 10 and 20 % attackers, and attack-free"
  "$sim" --quiet sweep simulations/experiments/byzantine.toml --rounds 6 --out runs/sweep/byzantine | tail -n 12
  echo "== the same with int8 updates (FedAvg, median, Krum; sign-flip at 10 %)"
  "$sim" --quiet sweep simulations/experiments/byzantine.toml --rounds 6 --encoding int8 \
    --strategies fed-avg,median,krum --attacks sign-flip --fractions 0.1 --out runs/sweep/byzantine-int8 | tail -n 8
fi

if run compression; then
  echo "== compressed updates on LEAF Shakespeare: f32, int8, int4"
  for e in f32 int8 int4; do
    "$sim" --quiet run simulations/experiments/leaf-fedavg.toml --encoding "$e" --name "leaf-fedavg-$e" | tail -n 8
  done
fi
