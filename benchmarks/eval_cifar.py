"""Evaluates a learned optimizer on the CIFAR-10 ConvNets against tuned baselines.

The protocol of :func:`metatrain.evaluation.evaluate`: for each task, Adam, SGD with momentum
0.9 and RMSProp are each tuned over a half-decade grid of 7 learning rates (Adam and RMSProp
1e-4..1e-1, SGD 1e-3..1) by final validation loss, every run from ``--seeds`` evaluation seeds
(PRNG keys 10000+, disjoint from meta-training seeds); the learned optimizer runs from the
same seeds. Training uses the rows meta-training trained on; validation uses the last
``--holdout_size`` rows of the training split (5000 by default), which the ``cifar`` recipe
holds out of meta-training altogether. Baseline runs are cached (``--cache_dir``), so
evaluating another optimizer on the same protocol only trains that optimizer.

Usage::

  export OPTAX_LEARNED_DATA=/path/to/cifar10   # holds cifar10_train.npz
  python -m benchmarks.eval_cifar path/to/checkpoint               # cifar_conv_32, 1000 steps
  python -m benchmarks.eval_cifar cifar --tasks all --seeds 5      # bundled name, all variants
  python -m benchmarks.eval_cifar none --tasks cifar_conv_16       # baselines only
  python -m benchmarks.eval_cifar ckpt --steps 20 --seeds 1 --learning_rates 1e-3,1e-2  # smoke
  python -m benchmarks.eval_cifar cifar --num_steps   # the optimizer told the horizon
  python -m benchmarks.eval_cifar cifar --learning_rate 0.5   # its step multiplier

Outputs per task under ``--out_dir/<task>/``: ``results.json`` (summaries and final metrics),
``curves.json`` (the per-step curves), ``results.md``, ``loss_vs_step.png``,
``loss_vs_time.png``.

The ConvNet runs with ``conv_impl="lax"`` by default: it computes the same function as the
``"patches"`` form used in meta-training, and from a Python loop it is the faster of the two on
XLA:CPU (about 24 vs 60 ms per step at 32x32, batch 128, 2 cores). Pass ``--conv_impl
patches`` to time the meta-training form. On 2 CPU cores the full protocol (22 optimizer
settings x 3 seeds x 1000 steps) takes roughly 30-40 minutes for ``cifar_conv_32``.
"""

import argparse
import logging
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

from metatrain import evaluation

TASKS = ("cifar_conv_32", "cifar_conv_16", "cifar_conv_8", "cifar_conv_32_w64")


def comma_separated(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
  """An argparse ``type``: comma-separated values, each converted by ``kind``."""
  return lambda text: tuple(kind(value) for value in text.split(",") if value.strip())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("optimizer", help="bundled name or checkpoint path; 'none': baselines only")
  parser.add_argument("--tasks", default="cifar_conv_32",
                      help=f"comma-separated tasks of {TASKS}, or 'all'")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--eval_every", type=int, default=None,
                      help="steps between evaluations (default steps // 25)")
  parser.add_argument("--num_eval_batches", type=int, default=evaluation.DEFAULT_NUM_EVAL_BATCHES)
  parser.add_argument("--baselines", default=",".join(evaluation.BASELINES))
  parser.add_argument("--learning_rates", type=comma_separated(float), default=None,
                      help="one comma-separated grid for every baseline (default: 7 per "
                           "baseline, see metatrain.evaluation.DEFAULT_LEARNING_RATES)")
  parser.add_argument("--conv_impl", default="lax", choices=("lax", "patches"))
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--num_steps", action="store_true",
                      help="tell the learned optimizer the horizon (load(..., num_steps=steps))")
  parser.add_argument("--learning_rate", type=float, default=1.0,
                      help="the learned optimizer's step multiplier (load(..., learning_rate=))")
  parser.add_argument("--holdout_size", type=int, default=5000,
                      help="last training rows that meta-training never saw (the cifar recipe "
                           "holds out 5000); validation uses them. 0: validate on the "
                           "meta-validation rows instead")
  parser.add_argument("--data_dir", default=None,
                      help="CIFAR-10 directory (default $OPTAX_LEARNED_DATA)")
  parser.add_argument("--out_dir", default="results/eval_cifar")
  parser.add_argument("--cache_dir", default=None,
                      help=f"baseline cache (default {evaluation.DEFAULT_CACHE_DIR})")
  parser.add_argument("--no_cache", action="store_true")
  parser.add_argument("--timing_reps", type=int, default=20,
                      help="rounds of the interleaved step-cost measurement (0: skip)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
  logging.getLogger("jax").setLevel(logging.WARNING)

  if not args.learning_rate > 0:
    parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
  names = TASKS if args.tasks == "all" else tuple(args.tasks.split(","))
  unknown = sorted(set(names) - set(TASKS))
  if unknown:
    parser.error(f"unknown task(s) {unknown}; choose from {TASKS} or 'all'")
  optimizer = None if args.optimizer.lower() == "none" else args.optimizer
  overrides = {"conv_impl": args.conv_impl}
  if args.holdout_size:
    overrides.update(holdout_size=args.holdout_size, validate_on="holdout")
  if args.batch_size is not None:
    overrides["batch_size"] = args.batch_size

  protocol = evaluation.EvaluationProtocol(
      steps=args.steps, seeds=args.seeds, eval_every=args.eval_every,
      num_eval_batches=args.num_eval_batches,
      baselines=tuple(b for b in args.baselines.split(",") if b),
      learning_rates=args.learning_rates, timing_reps=args.timing_reps,
      use_cache=not args.no_cache)
  load_kwargs = {"num_steps": args.steps} if args.num_steps else {}
  if args.learning_rate != 1.0:
    load_kwargs["learning_rate"] = args.learning_rate
  for name in names:
    out = pathlib.Path(args.out_dir) / name
    start = time.perf_counter()
    results = evaluation.evaluate(
        optimizer, name, out_dir=out, protocol=protocol, data_dir=args.data_dir,
        cache_dir=args.cache_dir, task_overrides=overrides,
        load_kwargs=load_kwargs)
    print(f"\n{name}: {time.perf_counter() - start:.0f} s, results in {out}\n")
    print(evaluation.markdown(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
