"""Cost of the learned optimizer relative to Adam in a real training step.

Measures, in one run and with interleaved repeated timing (median of many reps after a
warm-up), the ratio of a jitted full training step (forward, backward, optimizer update,
apply) with the learned optimizer to the same step with ``optax.adam``, plus the jitted
update alone and the optimizer state's bytes per parameter, for

- the paper's ConvNet: 3 layers of 32 channels (3x3 stride-2 SAME convs, relu, global
  average pool, linear to 10 classes) at batch 128 on 32x32x3 and 16x16x3 inputs, where
  convolutions reuse each of its 20k weights many times;
- a parameter-heavy MLP on flattened 32x32x3 images (3072-256-256-10, 855k parameters) at
  batch 128, where the optimizer's cost per parameter shows.

Usage::

  python -m benchmarks.bench_update                      # the default config
  python -m benchmarks.bench_update --hidden_sizes 32,32 32 16
  python -m benchmarks.bench_update --reps 300 --models conv32 mlp
  python -m benchmarks.bench_update --optimizer cifar     # a bundled or saved optimizer

The training step is :func:`metatrain.measurement.make_train_step` on a task that trains the
model on one fixed batch of random images (:class:`FixedBatchTask`), called from a Python
loop (:class:`metatrain.measurement.TrainingLoop`).

Targets on 2 CPU cores (median step ratio): <= 1.05 for the 32x32 ConvNet, <= 1.20 at
16x16, <= 1.10 for the MLP.

Besides the median (the figure the targets refer to), the 10th percentile of each timing is
printed: on a shared machine it is less affected by other processes.
"""

import argparse
import dataclasses
import math
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import optax_learned
from metatrain import measurement, timing
from metatrain.tasks import base

BATCH = 128
NUM_CLASSES = 10
TARGETS = {"conv32": 1.05, "conv16": 1.20, "mlp": 1.10}


class ConvNet(nn.Module):
  """Three 3x3 stride-2 SAME convs of 32 channels, relu, global average pool, linear."""
  channels: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(3):
      x = nn.relu(nn.Conv(self.channels, (3, 3), strides=(2, 2), padding="SAME")(x))
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))


class MLP(nn.Module):
  """Dense 256-256 relu layers on flattened images, then 10 classes."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for _ in range(2):
      x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(NUM_CLASSES)(x)


MODELS = {"conv32": (ConvNet, 32), "conv16": (ConvNet, 16), "mlp": (MLP, 32)}


def state_bytes_per_param(tx: optax.GradientTransformation, params) -> float:
  """Bytes of the optimizer state's arrays per parameter (scalars such as counts excluded)."""
  state = jax.eval_shape(tx.init, params)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)
             if x.shape) / num_params


@dataclasses.dataclass(frozen=True)
class FixedBatchTask(base.Task):
  """A classifier trained on one fixed batch: the data is the batch, whatever the key.

  Attributes:
    model: the Flax model, from images ``(batch, size, size, 3)`` to 10 logits.
    size: the images' height and width.
  """
  model: nn.Module
  size: int

  def init_params(self, key):
    return self.model.init(key, jnp.zeros((1, self.size, self.size, 3), jnp.float32))["params"]

  def loss(self, params, batch):
    logits = self.model.apply({"params": params}, batch["images"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def sample_batch(self, data, key, split):
    del key, split
    return data


def make_update(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """The jitted optimizer update alone (no apply)."""
  return jax.jit(lambda grads, opt_state, params: tx.update(grads, opt_state, params))


def bench_model(name: str, candidates: dict[str, optax.GradientTransformation], reps: int,
                warmup: int) -> dict[str, dict[str, Any]]:
  """(median, p10) step and update times and state bytes per parameter of one model, for
  Adam and each candidate."""
  module, size = MODELS[name]
  task = FixedBatchTask(module(), size)
  key_params, key_images, key_labels = jax.random.split(jax.random.key(0), 3)
  data = {"images": jax.random.normal(key_images, (BATCH, size, size, 3), jnp.float32),
          "labels": jax.random.randint(key_labels, (BATCH,), 0, NUM_CLASSES)}
  params = task.init_params(key_params)
  grads = jax.grad(task.loss)(params, data)

  txs = {"adam": optax.adam(1e-3), **candidates}
  steps, updates = {}, {}
  for label, tx in txs.items():
    steps[label] = measurement.TrainingLoop(
        measurement.make_train_step(task, tx), measurement.initial_state(task, tx, key_params),
        key_params, data)
    update, opt_state = make_update(tx), tx.init(params)
    updates[label] = lambda update=update, opt_state=opt_state: update(grads, opt_state, params)
  step_times = timing.interleaved_times(steps, reps, warmup)
  update_times = timing.interleaved_times(updates, reps, warmup)
  return {label: {"step": step_times[label], "update": update_times[label],
                  "bytes": state_bytes_per_param(tx, params)} for label, tx in txs.items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--hidden_sizes", nargs="*", default=None,
                      help="candidate hidden_sizes, e.g. 32 16 8 (default: the default "
                           "LearnedOptimizer config)")
  parser.add_argument("--optimizer", nargs="*", default=[],
                      help="bundled names or checkpoint directories to time as well")
  parser.add_argument("--skip_nonfinite", choices=["true", "false", "both"], default="true",
                      help="the skip_nonfinite setting(s) of the candidates")
  parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--reps", type=int, default=200)
  parser.add_argument("--warmup", type=int, default=10)
  args = parser.parse_args(argv)

  candidates = {}
  configs = ([None] if args.hidden_sizes is None else
             [tuple(int(s) for s in spec.split(",") if s) for spec in args.hidden_sizes])
  skips = {"true": [True], "false": [False], "both": [True, False]}[args.skip_nonfinite]
  for hidden_sizes in configs:
    for skip in skips:
      kwargs = {"skip_nonfinite": skip}
      if hidden_sizes is not None:
        kwargs["hidden_sizes"] = hidden_sizes
      lopt = optax_learned.LearnedOptimizer(**kwargs)
      name = "learned" + str(lopt.hidden_sizes).replace(" ", "") + ("" if skip else " noskip")
      candidates[name] = lopt.transform(lopt.init(jax.random.key(1)))
  for name in args.optimizer:
    candidates[name] = optax_learned.load(name)

  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, load average "
        f"{load:.1f}; batch {BATCH}, {args.reps} interleaved reps, {args.warmup} warm-up")
  failed = False
  for model in args.models:
    results = bench_model(model, candidates, args.reps, args.warmup)
    adam = results["adam"]
    print(f"\n{model}: adam step {adam['step'][0] * 1e3:.2f} ms (p10 "
          f"{adam['step'][1] * 1e3:.2f}), adam update {adam['update'][0] * 1e3:.3f} ms (p10 "
          f"{adam['update'][1] * 1e3:.3f}), adam state {adam['bytes']:.1f} bytes/param")
    print(f"  {'optimizer':<24}{'step ms':>9}{'step ratio':>12}{'(p10)':>8}{'update ms':>11}"
          f"{'update ratio':>14}{'(p10)':>8}{'bytes/param':>13}  target (median step ratio)")
    for name in candidates:
      r = results[name]
      ratio = r["step"][0] / adam["step"][0]
      target = TARGETS[model]
      verdict = f"<= {target:.2f} " + ("ok" if ratio <= target else "MISSED")
      failed |= ratio > target
      print(f"  {name:<24}{r['step'][0] * 1e3:>9.2f}{ratio:>12.3f}"
            f"{r['step'][1] / adam['step'][1]:>8.3f}{r['update'][0] * 1e3:>11.3f}"
            f"{r['update'][0] / adam['update'][0]:>14.2f}"
            f"{r['update'][1] / adam['update'][1]:>8.2f}{r['bytes']:>13.1f}  {verdict}")
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
