#!/usr/bin/env bash
# One prepared check for a lent accelerator (or, with QUICK=1, a few steps on any machine).
#
# Runs, in order, and writes everything to one results file ($OUT/device_check.txt):
#   1. the tests that matter on a GPU: the update against its float64 reference, optax's
#      common checks (convergence, tree_map_params, inject_hyperparams, jit), Flax training;
#   2. benchmarks.bench_update: step-cost ratios against Adam (ConvNet and wide MLP);
#   3. benchmarks.bench_estimators: estimator throughput against Adam, particles
#      vectorised (particle_chunk=0, the GPU default);
#   4. a short meta-training run of the cifar recipe for $MINUTES minutes (QUICK: 3 steps),
#      with its meta-steps per second.
#
# Usage (from the repository root, CIFAR-10 in $OPTAX_LEARNED_DATA):
#   bash benchmarks/device_check.sh                 # on the lent GPU: under 10 minutes
#   QUICK=1 OUT=/tmp/check bash benchmarks/device_check.sh   # a few steps (the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
QUICK=${QUICK:-0}
MINUTES=${MINUTES:-3}
mkdir -p "$OUT"
RESULTS="$OUT/device_check.txt"
: > "$RESULTS"

section() { printf '\n== %s ==\n' "$1" | tee -a "$RESULTS"; }
run() { "$@" 2>&1 | tee -a "$RESULTS"; }

section "environment"
run python -c "import jax, optax, optax_learned; print('jax', jax.__version__, 'backend', \
jax.default_backend(), 'devices', jax.devices(), 'optax', optax.__version__, \
'optax_learned', optax_learned.__version__)"

if [ "$QUICK" = 1 ]; then
  TESTS="tests/test_optax_conventions.py -k parabola"
  UPDATE_ARGS="--reps 3 --warmup 1 --models conv16"
  ESTIMATOR_ARGS="--tasks digits_mlp --estimators pes --repeats 1 --truncation_length 2"
  TRAIN_ARGS="--config quadratic --steps 3"
else
  TESTS="tests/test_learned_optimizer.py tests/test_optax_conventions.py tests/test_flax_integration.py"
  UPDATE_ARGS="--reps 100"
  ESTIMATOR_ARGS="--tasks digits_mlp cifar_conv_16 --set estimator.particle_chunk=0"
  TRAIN_ARGS="--config cifar --steps 100000"
fi

section "tests"
# shellcheck disable=SC2086
run python -m pytest -q -p no:cacheprovider $TESTS

section "bench_update"
# shellcheck disable=SC2086
run python -m benchmarks.bench_update $UPDATE_ARGS || true  # a missed target is a result

section "bench_estimators"
# shellcheck disable=SC2086
run python -m benchmarks.bench_estimators $ESTIMATOR_ARGS || true  # a missed target is a result

section "meta-training"
workdir="$OUT/metatrain"
start=$(date +%s)
if [ "$QUICK" = 1 ]; then
  # shellcheck disable=SC2086
  run metatrain train $TRAIN_ARGS --workdir "$workdir" --progress lines
else
  # shellcheck disable=SC2086
  timeout --signal=INT "$((MINUTES * 60))" metatrain train $TRAIN_ARGS --workdir "$workdir" \
    --progress lines 2>&1 | tee -a "$RESULTS" || true  # Ctrl-C (SIGINT) ends it cleanly
fi
seconds=$(( $(date +%s) - start ))
steps=$(python -c "import json, sys; lines = open(sys.argv[1]).read().splitlines(); \
print(json.loads(lines[-1])['step'] if lines else 0)" "$workdir/metrics.jsonl")
echo "meta-steps: $steps in ${seconds}s (compilation included)" | tee -a "$RESULTS"
section "done"
echo "results in $RESULTS" | tee -a "$RESULTS"
