#!/usr/bin/env bash
# Meta-trains several variants of a recipe side by side (one process each, e.g. on one GPU)
# and exports each at two points, for picking a recipe by evaluating the exports.
#
# Usage: benchmarks/metatrain_variants.sh OUT_DIR FIRST_STEPS SECOND_STEPS SECONDS_1 SECONDS_2
#   Each variant trains to FIRST_STEPS (at most SECONDS_1 s), is exported as
#   OUT_DIR/export/<variant>_a, then resumes to SECOND_STEPS (at most SECONDS_2 s more) and is
#   exported as OUT_DIR/export/<variant>_b. A run stopped by its time limit is exported from its
#   last checkpoint; the exported config.json and OUT_DIR/<variant>/metrics.jsonl say which step.
# Variants are lines of `name --set ...` in $VARIANTS (default below); the data directory is
# $OPTAX_LEARNED_DATA.
set -u
out=$1; first=$2; second=$3; limit1=$4; limit2=$5
config=${CONFIG:-cifar}
default_variants="base
pes --set estimator.name=pes
merged_h16 --set optimizer.hidden_sizes=[16]
pes_h16 --set estimator.name=pes --set optimizer.hidden_sizes=[16]"
variants=${VARIANTS:-$default_variants}
mkdir -p "$out/export"
run_variant() {
  local name=$1; shift
  local work="$out/$name"
  timeout "$limit1" python3 -m metatrain train --config "$config" "$@" --workdir "$work" \
      --steps "$first" --progress lines > "$out/$name.log" 2>&1
  python3 -m metatrain export --workdir "$work" --out "$out/export/${name}_a" >> "$out/$name.log" 2>&1
  timeout "$limit2" python3 -m metatrain train --config "$config" "$@" --workdir "$work" \
      --steps "$second" --progress lines >> "$out/$name.log" 2>&1
  python3 -m metatrain export --workdir "$work" --out "$out/export/${name}_b" >> "$out/$name.log" 2>&1
}
while read -r name sets; do
  [ -n "$name" ] || continue
  # shellcheck disable=SC2086 # the --set arguments are meant to split
  run_variant "$name" $sets &
done <<< "$variants"
wait
