"""Cost of the learned optimizer relative to Adam in a real training step.

Measures, in one run and with interleaved repeated timing (median of many reps after a
warm-up), the ratio of a jitted full training step (forward, backward, optimizer update,
apply) with the learned optimizer to the same step with ``optax.adam``, for a 3-layer
32-channel ConvNet (3x3 stride-2 SAME convs, relu, global average pool, linear to 10
classes) at batch 128 on 32x32x3 and 16x16x3 inputs, plus the jitted update alone.

Usage::

  python benchmarks/bench_update.py                      # the default config
  python benchmarks/bench_update.py --hidden_sizes 32,32 32 16,16
  python benchmarks/bench_update.py --reps 300 --sizes 32
  python benchmarks/bench_update.py --hidden_sizes 16 --skip_nonfinite both

Targets on 2 CPU cores: full-step ratio <= 1.10 at 32x32 and <= 1.20 at 16x16.

Besides the median (the figure the targets refer to), the 10th percentile of each timing is
printed: on a shared machine it is less affected by other processes.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import optax_learned  # pylint: disable=g-import-not-at-top,wrong-import-position

BATCH = 128
NUM_CLASSES = 10
TARGETS = {32: 1.10, 16: 1.20}


class ConvNet(nn.Module):
  """Three 3x3 stride-2 SAME convs of 32 channels, relu, global average pool, linear."""
  channels: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(3):
      x = nn.relu(nn.Conv(self.channels, (3, 3), strides=(2, 2), padding="SAME")(x))
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))


def make_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable[..., Any]:
  """A jitted full training step: forward, backward, optimizer update, apply."""

  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_update(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """The jitted optimizer update alone (no apply)."""
  return jax.jit(lambda grads, opt_state, params: tx.update(grads, opt_state, params))


def interleaved_times(fns: dict[str, Callable[[], Any]], reps: int,
                      warmup: int) -> dict[str, tuple[float, float]]:
  """Median and 10th percentile seconds per call of each thunk.

  The thunks are called in turn, ``reps`` times each after ``warmup`` rounds, so that drift
  in the machine's load affects all of them alike.
  """
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(ts), statistics.quantiles(ts, n=10)[0])
          for name, ts in times.items()}


class _Loop:
  """Calls a training step repeatedly, threading params and optimizer state."""

  def __init__(self, step, params, opt_state, images, labels):
    self.step, self.params, self.opt_state = step, params, opt_state
    self.images, self.labels = images, labels

  def __call__(self):
    self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.images,
                                                  self.labels)
    return loss


def bench_size(size: int, candidates: dict[str, optax.GradientTransformation], reps: int,
               warmup: int) -> dict[str, dict[str, tuple[float, float]]]:
  """(median, p10) step and update times at one input size, for Adam and each candidate."""
  model = ConvNet()
  key_params, key_images, key_labels = jax.random.split(jax.random.key(0), 3)
  images = jax.random.normal(key_images, (BATCH, size, size, 3), jnp.float32)
  labels = jax.random.randint(key_labels, (BATCH,), 0, NUM_CLASSES)
  params = model.init(key_params, images[:1])["params"]
  grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, images), labels).mean())(params)

  txs = {"adam": optax.adam(1e-3), **candidates}
  steps, updates = {}, {}
  for name, tx in txs.items():
    steps[name] = _Loop(make_step(model, tx), params, tx.init(params), images, labels)
    update, opt_state = make_update(tx), tx.init(params)
    updates[name] = lambda update=update, opt_state=opt_state: update(grads, opt_state, params)
  step_times = interleaved_times(steps, reps, warmup)
  update_times = interleaved_times(updates, reps, warmup)
  return {name: {"step": step_times[name], "update": update_times[name]} for name in txs}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hidden_sizes", nargs="*", default=None,
                      help="candidate hidden_sizes, e.g. 32,32 32 16,16 (default: the default "
                           "LearnedOptimizer config)")
  parser.add_argument("--skip_nonfinite", choices=["true", "false", "both"], default="true",
                      help="the skip_nonfinite setting(s) of the candidates")
  parser.add_argument("--sizes", type=int, nargs="*", default=[32, 16])
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

  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, load average "
        f"{load:.1f}; batch {BATCH}, {args.reps} interleaved reps, {args.warmup} warm-up")
  failed = False
  for size in args.sizes:
    results = bench_size(size, candidates, args.reps, args.warmup)
    adam = results["adam"]
    print(f"\n{size}x{size}x3: adam step {adam['step'][0] * 1e3:.2f} ms (p10 "
          f"{adam['step'][1] * 1e3:.2f}), adam update {adam['update'][0] * 1e3:.3f} ms (p10 "
          f"{adam['update'][1] * 1e3:.3f})")
    print(f"  {'optimizer':<24}{'step ms':>9}{'step ratio':>12}{'(p10)':>8}{'update ms':>11}"
          f"{'update ratio':>14}{'(p10)':>8}  target (median step ratio)")
    for name in candidates:
      r = results[name]
      ratio = r["step"][0] / adam["step"][0]
      target = TARGETS.get(size)
      verdict = "" if target is None else (f"<= {target:.2f} " +
                                           ("ok" if ratio <= target else "MISSED"))
      failed |= target is not None and ratio > target
      print(f"  {name:<24}{r['step'][0] * 1e3:>9.2f}{ratio:>12.3f}"
            f"{r['step'][1] / adam['step'][1]:>8.3f}{r['update'][0] * 1e3:>11.3f}"
            f"{r['update'][0] / adam['update'][0]:>14.2f}"
            f"{r['update'][1] / adam['update'][1]:>8.2f}  {verdict}")
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
