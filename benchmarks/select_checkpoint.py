"""Picks among exported checkpoints of a meta-training run by a meta-validation score.

Meta-training curves of the ``cifar`` recipe are noisy, and later weights are not always
better (see ``checkpoints/cifar/MODEL_CARD.md``). This script trains the paper's 32x32
ConvNet with each candidate and with Adam at one learning rate, from *selection* seeds
(PRNG keys 20000+, disjoint from meta-training's and from the evaluation's 10000+), and
validates on the meta-validation rows (``validate_on="valid"``), never on the holdout rows
that the final evaluation uses. It prints one row per candidate: final training and
validation loss, and steps to reach Adam's final training loss. The candidate with the lowest
final validation loss is printed last.

Usage::

  export OPTAX_LEARNED_DATA=/path/to/cifar10
  python -m benchmarks.select_checkpoint runs/exp/step_300 runs/exp/step_400 --seeds 2
"""

import argparse
import logging
import math
import sys

import numpy as np

import optax_learned
from metatrain import evaluation, tasks

SELECTION_SEED_OFFSET = 20_000


def score(run: evaluation.Run, target: float) -> dict:
  """Final losses of a run and the step at which its mean training loss reaches ``target``."""
  mean = run["mean"]
  step, _ = evaluation.time_to_target(run["steps"], mean["seconds"], mean["train_loss"], target)
  return {"train": mean["train_loss"][-1], "valid": mean["valid_loss"][-1], "steps": step}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("checkpoints", nargs="+", help="exported checkpoint directories")
  parser.add_argument("--task", default="cifar_conv_32")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--adam_learning_rate", type=float, default=3.16e-3,
                      help="Adam's learning rate (the tuned one of the evaluation protocol)")
  parser.add_argument("--holdout_size", type=int, default=5000,
                      help="rows kept out of training, as in the recipe (not validated on)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)

  task = tasks.get_task(args.task, conv_impl="lax", holdout_size=args.holdout_size,
                        validate_on="valid")
  data = task.load_data()
  kwargs = dict(steps=args.steps, seeds=args.seeds, data=data,
                seed_offset=SELECTION_SEED_OFFSET)
  adam = evaluation.train_baseline("adam", args.adam_learning_rate, task, **kwargs)
  target = adam["mean"]["train_loss"][-1]
  print(f"adam {args.adam_learning_rate:g}: train {target:.4f} "
        f"valid {adam['mean']['valid_loss'][-1]:.4f}", flush=True)
  scores = {}
  for path in args.checkpoints:
    run = evaluation.evaluate_transformation(optax_learned.load(path), task, **kwargs)
    scores[path] = score(run, target)
    s = scores[path]
    steps = "-" if s["steps"] is None else f"{s['steps']:.0f}"
    print(f"{path}: train {s['train']:.4f} valid {s['valid']:.4f} "
          f"steps to Adam's train loss {steps}", flush=True)
  best = min(scores, key=lambda p: scores[p]["valid"] if math.isfinite(scores[p]["valid"])
             else np.inf)
  print(f"best by meta-validation loss: {best}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
