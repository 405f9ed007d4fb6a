"""Screens horizon-free step decays of a learned optimizer on models outside the suite.

A learned optimizer loaded without ``num_steps`` multiplies its steps by its checkpoint's
decay (``anneal_steps``: ``1 / (1 + t / A)``). This benchmark replaces that decay with

    c / (1 + (t / tau) ** q) ** (p / q)

(the checkpoint's decay removed with ``anneal_steps=None``, the variant passed as the
``learning_rate`` schedule), and trains each variant on models that neither
meta-training nor the generality suite uses, validated on the meta-validation rows (not the
holdout), from seed 20000, which no evaluation uses. It prints one JSON line per model and
variant: final training and validation loss and the lowest validation loss on the way.

Variants are written ``c:tau:p[:q]`` (``q`` defaults to 1); ``1:1000:1`` is ``cifar``'s own
decay. ``wd:K`` keeps the checkpoint's own step decay and sets its decoupled weight decay
(``LearnedOptimizer.weight_decay``) to ``K``. ``adam:LR`` trains Adam at a constant learning
rate for comparison.

Usage::

  export OPTAX_LEARNED_DATA=/path/to/cifar10
  python -m benchmarks.decay_screen --models convnet_1000 --variants 1:1000:1,1.5:1000:2:2
  python -m benchmarks.decay_screen --models mlp_3000 --variants 1:1000:1,adam:1e-4 --seeds 3
  python -m benchmarks.decay_screen --variants wd:0,wd:3e-4,wd:5e-4,wd:1e-3
"""

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import optax

import optax_learned
from benchmarks.eval_cifar import comma_separated
from metatrain import evaluation, measurement
from metatrain import tasks as tasks_lib

# Each screening model and its horizon; none of them is a generality-suite model.
MODELS: dict[str, tuple[Callable[[], tasks_lib.Task], int]] = {
    # The paper's ConvNet (in family), the in-family target's horizon.
    "convnet_1000": (lambda: tasks_lib.get_task("cifar_conv_32", holdout_size=5000), 1000),
    # MLP 3072-512-512-10 on pixels: overfits by 3000 steps.
    "mlp_3000": (lambda: tasks_lib.MLPTask(
        hidden_sizes=(512, 512), resolution=32, batch_size=128, holdout_size=5000), 3000),
    # 3x64 strided ConvNet with a flatten + dense head, batch 64.
    "flatten_convnet_3000": (lambda: tasks_lib.ConvNetTask(
        width=64, depth=3, head="flatten", resolution=32, batch_size=64, holdout_size=5000,
        conv_impl="lax"), 3000),
}
SEED_OFFSET = 20000


def decay(c: float, tau: float, p: float, q: float = 1.0) -> optax.Schedule:
  """The step multiplier ``c / (1 + (t / tau)^q)^(p / q)`` of the step count ``t``."""
  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    return c / (1.0 + (t / tau) ** q) ** (p / q)
  return schedule


def variant_optimizer(variant: str, checkpoint: str) -> optax.GradientTransformation:
  """The optimizer a variant string names (see the module docstring).

  Raises:
    ValueError: a variant that is none of ``adam:LR``, ``wd:K`` and ``c:tau:p[:q]``.
  """
  if variant.startswith("adam:"):
    return optax.adam(float(variant.removeprefix("adam:")))
  lopt, meta_params = optax_learned.load_weights(checkpoint)
  if variant.startswith("wd:"):
    weight_decay = float(variant.removeprefix("wd:"))
    return dataclasses.replace(lopt, weight_decay=weight_decay).transform(meta_params)
  fields = variant.split(":")
  if len(fields) not in (3, 4):
    raise ValueError(f"variant {variant!r} is none of adam:LR, wd:K and c:tau:p[:q]")
  undecayed = dataclasses.replace(lopt, anneal_steps=None)
  return undecayed.transform(meta_params, learning_rate=decay(*(float(x) for x in fields)))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", default="cifar")
  parser.add_argument("--models", type=comma_separated(str), default=tuple(MODELS))
  parser.add_argument("--variants", type=comma_separated(str), required=True)
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args(argv)
  unknown = sorted(set(args.models) - set(MODELS))
  if unknown:
    parser.error(f"unknown models {unknown}; known: {sorted(MODELS)}")
  for name in args.models:
    make_task, steps = MODELS[name]
    task = tasks_lib.with_data_dir(make_task(), args.data_dir)
    data = task.load_data()
    for variant in args.variants:
      start = time.time()
      run = measurement.train(variant_optimizer(variant, args.checkpoint), task, steps=steps,
                              seeds=args.seeds, data=data, seed_offset=SEED_OFFSET)
      final = evaluation.final_metrics(run)
      print(json.dumps({
          "model": name, "steps": steps, "variant": variant, "seeds": args.seeds,
          "train": round(final["final_train_loss"], 4),
          "valid": round(final["final_valid_loss"], 4),
          "best_valid": round(float(np.nanmin(run["mean"]["valid_loss"])), 4),
          "seconds": round(time.time() - start)}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
