"""Interleaved timing of jitted calls: step-cost ratios that hold on a noisy machine.

Benchmarks and evaluations compare optimizers by the ratio of their step times measured in
one process, the candidates called in turn so that drift in the machine's load affects all
of them alike. :mod:`metatrain.measurement` times training steps with it
(:func:`~metatrain.measurement.interleaved_step_seconds`).
"""

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

__all__ = ("interleaved_times",)


def interleaved_times(fns: dict[str, Callable[[], Any]], reps: int,
                      warmup: int) -> dict[str, tuple[float, float]]:
  """Median and 10th percentile seconds per call of each thunk.

  Args:
    fns: thunks by name; each runs one step (its result is blocked on).
    reps: timed calls of each thunk.
    warmup: untimed rounds first (compilation, caches).

  Returns:
    ``{name: (median, p10)}`` in seconds.
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
  return {name: (statistics.median(ts),
                 statistics.quantiles(ts, n=10)[0] if len(ts) > 1 else ts[0])
          for name, ts in times.items()}
