"""Step cost of learned optimizers on the generality suite's models, against Adam.

For each suite model (:data:`metatrain.generality.models.SUITE`, default: the CIFAR-10
ones), the jitted training step of the suite's own loop (batches sampled inside ``jit``,
BatchNorm statistics updated) is timed with Adam and with each learned optimizer,
interleaved in one process (:func:`metatrain.generality.protocol.step_cost_ratio`), and
the median step time's ratio to Adam's is printed next to the issue's target (at most
1.10x on every CIFAR-10 suite model). The generality suite times each model too, but
while other runs may share the machine; this benchmark is meant for a quiet one.

Usage::

  python -m benchmarks.suite_step_cost                       # cifar, CIFAR-10 models
  python -m benchmarks.suite_step_cost --reps 500 --models vgg_dense_head,pixel_mlp
  python -m benchmarks.suite_step_cost --optimizer cifar --optimizer runs/export \\
      --out benchmarks/results/suite_step_cost.json

Exits with status 1 when a CIFAR-10 model misses the target.
"""

import argparse
import json
import os
import pathlib
import sys

import jax
import optax

import optax_learned
from metatrain._json_io import atomic_write, jsonable
from metatrain.generality import protocol

TARGET = 1.10


def main(argv: list[str] | None = None) -> int:
  """Times every model (see the module docstring); returns 1 if a target is missed."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--optimizer", action="append", default=None,
                      help="bundled names or checkpoint directories (repeatable; "
                           "default: cifar)")
  parser.add_argument("--models", default="",
                      help="comma-separated suite models (default: the CIFAR-10 ones)")
  parser.add_argument("--reps", type=int, default=200, help="interleaved timed steps of each")
  parser.add_argument("--data-dir", default=None,
                      help="CIFAR-10 directory (default $OPTAX_LEARNED_DATA, else TFDS)")
  parser.add_argument("--out", default=None, help="also write the ratios to this JSON file")
  args = parser.parse_args(argv)

  models = protocol.suite_models(args.models)
  if not args.models:
    models = [m for m in models if m.in_domain]
  names = args.optimizer or ["cifar"]
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}; {args.reps} interleaved reps")
  print(f"{'model':<26}{'adam ms':>9}" + "".join(f"{n[-20:]:>22}" for n in names))
  txs = {"adam": optax.adam(1e-3), **{n: optax_learned.load(n) for n in names}}
  results, missed = {}, False
  for model in models:
    ratios = protocol.step_cost_ratio(model, txs, args.reps, args.data_dir)
    results[model.name] = ratios
    cells = []
    for n in names:
      over = model.in_domain and ratios[n] > TARGET
      missed |= over
      cells.append(f"{ratios[n]:.3f}x {'MISSED' if over else 'ok':>6}" if model.in_domain
                   else f"{ratios[n]:.3f}x {'(n/a)':>6}")
    print(f"{model.name:<26}{ratios['adam_ms']:>9.2f}" + "".join(f"{c:>22}" for c in cells),
          flush=True)
  print(f"target: at most {TARGET:.2f}x Adam's median step on every CIFAR-10 model")
  if args.out:
    atomic_write(pathlib.Path(args.out), json.dumps(jsonable(
        {"reps": args.reps, "target": TARGET, "load_average": load, "ratios": results}),
        indent=1))
  return int(missed)


if __name__ == "__main__":
  sys.exit(main())
