"""Times ConvNet training steps with the ``patches`` and ``lax`` convolutions.

On XLA:CPU a step with ``lax.conv`` is much slower inside ``lax.scan`` than from a Python loop
(jax-ml/jax#12868). Meta-training runs inner steps inside ``scan``, ``vmap`` over tasks, and
differentiates through them, so each implementation is timed (per inner step, milliseconds):

  (a) loop:     a jitted SGD step called from a Python loop;
  (b) scan:     ``lax.scan`` over ``--unroll`` steps in one jit;
  (c) vmap:     (b) vmapped over ``--tasks`` task instances (time per vmapped step);
  (d) metagrad: gradient of the final loss of (b) w.r.t. the log learning rate (second order).

Usage: python -m benchmarks.conv_in_scan [--resolutions 32 16] [--batch 128] [--repeats 3]
Data is synthetic (random uint8 images); no dataset is needed.
"""

import argparse
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from metatrain.tasks import convnet

LOG_LR = math.log(0.1)


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
  """Returns (compile + first call seconds, best seconds of later calls).

  Calls ``repeats`` more times, or once when the first call took over 10 seconds.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats if first < 10.0 else 1):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return first, best


def bench(resolution: int, impl: str, batch: int, unroll: int, tasks: int,
          repeats: int) -> dict[str, float]:
  """Milliseconds per inner step for each mode, and compile seconds."""
  task = convnet.ConvNetTask(resolution=resolution, batch_size=batch, conv_impl=impl)
  key = jax.random.key(0)
  images = jax.random.randint(key, (2048, resolution, resolution, 3), 0, 256).astype(jnp.uint8)
  labels = jax.random.randint(key, (2048,), 0, 10)
  data = {s: {"image": images, "label": labels} for s in ("train", "valid")}

  def step(params, key, log_lr=LOG_LR):
    batch = task.sample_batch(data, key, "train")
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    return jax.tree.map(lambda p, g: p - jnp.exp(log_lr) * g, params, grads), loss

  def unrolled(params, key, log_lr=LOG_LR):
    params, losses = jax.lax.scan(lambda p, k: step(p, k, log_lr), params,
                                  jax.random.split(key, unroll))
    return losses[-1]

  params = task.init_params(key)
  step_jit = jax.jit(step)
  keys = jax.random.split(key, unroll)

  def loop():
    p = params
    for k in keys:
      p, loss = step_jit(p, k)
    return loss

  scan_jit = jax.jit(unrolled)
  many_params = jax.vmap(task.init_params)(jax.random.split(key, tasks))
  vmap_jit = jax.jit(jax.vmap(unrolled))
  many_keys = jax.random.split(key, tasks)
  metagrad_jit = jax.jit(jax.grad(unrolled, argnums=2))
  results = {}
  for name, fn, steps in [
      ("loop", loop, unroll),
      ("scan", lambda: scan_jit(params, key), unroll),
      ("vmap", lambda: vmap_jit(many_params, many_keys), unroll),
      ("metagrad", lambda: metagrad_jit(params, key, LOG_LR), unroll),
  ]:
    first, best = _time(fn, repeats)
    results[name] = 1e3 * best / steps
    results[name + "_compile_s"] = first - best
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 16])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--unroll", type=int, default=10)
  parser.add_argument("--tasks", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch}, "
        f"scan of {args.unroll} steps, vmap over {args.tasks} tasks; ms per inner step (best "
        f"of {args.repeats}), compile s in brackets")
  modes = ("loop", "scan", "vmap", "metagrad")
  for resolution in args.resolutions:
    rows = {impl: bench(resolution, impl, args.batch, args.unroll, args.tasks, args.repeats)
            for impl in convnet.CONV_IMPLS}
    print(f"\n{resolution}x{resolution}")
    print(f"{'impl':>8} " + " ".join(f"{m:>16}" for m in modes) + f" {'scan/loop':>10}")
    for impl, r in rows.items():
      cells = " ".join(f"{r[m]:9.1f} ({r[m + '_compile_s']:4.1f})" for m in modes)
      print(f"{impl:>8} {cells} {r['scan'] / r['loop']:10.2f}")
    lax_, fast = rows["lax"], rows["patches"]
    print("lax/patches: " + ", ".join(f"{m} {lax_[m] / fast[m]:.2f}x" for m in modes))


if __name__ == "__main__":
  main()
