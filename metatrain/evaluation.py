"""Evaluation of a learned optimizer against tuned Adam, SGD with momentum and RMSProp.

The protocol (:func:`evaluate`, configured by an :class:`EvaluationProtocol`):

* Every optimizer trains the same task for ``steps`` steps from ``seeds`` seeds. Seed ``s``
  becomes the PRNG key ``10_000 + s`` (:data:`EVAL_SEED_OFFSET`), split into an
  initialisation key and a batch key; meta-training uses small seeds, so evaluation runs never
  reuse a meta-training initialisation or batch stream. All optimizers share these keys.
* The runs are measured by :mod:`metatrain.measurement`: a jitted training step called from a
  Python loop, evaluation every ``eval_every`` steps (and at steps 0 and ``steps``) on
  ``num_eval_batches`` fixed training and validation batches, the same for every optimizer,
  learning rate and seed; wall-clock seconds of the training steps only; a run whose
  evaluated losses become NaN or infinite stops there and is marked ``diverged``.
* Each baseline's learning rate is the one of the grid with the lowest final validation loss
  (mean over seeds); the best baseline is the tuned baseline with the lowest final validation
  loss.
* Time to target: the step and training seconds at which an optimizer's mean (over seeds)
  training-loss curve first reaches a target, linearly interpolated between evaluation points
  (``None`` if it never does). The target for each comparison is the tuned baseline's final
  mean training loss; the baseline's own time to it is computed the same way, and ratios are
  ``learned / baseline`` (below 1: the learned optimizer is faster).
* Stability of a run: ``diverged`` if any evaluated loss of any seed is NaN or infinite;
  ``stable`` if not diverged and the final mean training loss is at most
  :data:`STABILITY_TOLERANCE` times the mean training loss at the evaluation point nearest
  ``steps // 5``. A learned optimizer meta-trained on horizons shorter than ``steps`` often
  fails this; the meta-training ``max_horizon`` is reported when the checkpoint records it.

* Step cost, measured interleaved: wall-clock seconds of separate runs are distorted when the
  machine's load changes between them. After training, the learned optimizer's step and each
  tuned baseline's step are timed in turn
  (:func:`~metatrain.measurement.interleaved_step_seconds`), ``timing_reps`` rounds of
  ``TIMING_STEPS`` steps each, and the median per-step costs give ``step_cost_ratio``;
  ``interleaved_time_ratio`` is ``steps_ratio * step_cost_ratio``, the wall-clock ratio to
  the target at equal load.

Baseline runs are cached, one JSON file per (baseline, learning rate): see
:mod:`metatrain.baseline_cache`. Reports are written by :mod:`metatrain.evaluation_report`,
whose :func:`~metatrain.evaluation_report.markdown` and
:func:`~metatrain.evaluation_report.write_outputs` this module re-exports, as it re-exports
the names of :mod:`metatrain.measurement` it was the home of (``eval_steps``,
``default_eval_every``, ``mean_curves``, ``interleaved_step_seconds``, ...).
"""

import dataclasses
import functools
import logging
import math
import os
import pathlib
import platform
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import numpy as np
import optax

import optax_learned
from metatrain import baseline_cache, configs, measurement
from metatrain import tasks as tasks_lib
from metatrain._json_io import float_array, jsonable, lr_key
from metatrain.evaluation_report import markdown, write_outputs  # noqa: F401 (re-exported)
from metatrain.measurement import (  # noqa: F401 (re-exported: this module was their home)
    DEFAULT_NUM_EVAL_BATCHES,
    EVAL_SEED_OFFSET,
    TIMING_STEPS,
    Run,
    default_eval_every,
    eval_steps,
    interleaved_step_seconds,
    mean_curves,
)
from metatrain.tasks import base

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STABILITY_TOLERANCE = 1.05
DEFAULT_CACHE_DIR = "~/.cache/optax_learned/baselines"


def sgd_momentum(learning_rate: float) -> optax.GradientTransformation:
  """SGD with heavy-ball momentum 0.9."""
  return optax.sgd(learning_rate, momentum=0.9)


BASELINES: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adam": optax.adam,
    "sgd_momentum": sgd_momentum,
    "rmsprop": optax.rmsprop,
}


def _log_grid(low: float, high: float, num: int) -> tuple[float, ...]:
  return tuple(float(f"{lr:.3g}") for lr in np.logspace(math.log10(low), math.log10(high), num))


# Half-decade grids of 7 learning rates.
DEFAULT_LEARNING_RATES: dict[str, tuple[float, ...]] = {
    "adam": _log_grid(1e-4, 1e-1, 7),
    "sgd_momentum": _log_grid(1e-3, 1.0, 7),
    "rmsprop": _log_grid(1e-4, 1e-1, 7),
}

LearningRates = Sequence[float] | Mapping[str, Sequence[float]]


# -- training one transformation ----------------------------------------------------------


def _baseline(name: str, learning_rate: float) -> optax.GradientTransformation:
  """A baseline whose learning rate is stored in its state (``optax.inject_hyperparams``)."""
  return optax.inject_hyperparams(BASELINES[name])(learning_rate=learning_rate)


@functools.lru_cache(maxsize=32)
def _baseline_train_step(task: base.Task, baseline: str) -> Callable:
  """One jitted step for every learning rate of a baseline: the rate lives in the state."""
  return measurement.make_train_step(task, _baseline(baseline, 1.0))


def evaluate_transformation(
    tx: optax.GradientTransformation,
    task: base.Task | str,
    *,
    steps: int = 1000,
    seeds: int = 3,
    eval_every: int | None = None,
    num_eval_batches: int = DEFAULT_NUM_EVAL_BATCHES,
    data: base.Data | None = None,
    seed_offset: int = EVAL_SEED_OFFSET,
) -> Run:
  """Trains ``task`` with ``tx`` from several seeds and records learning curves.

  The runs of :func:`metatrain.measurement.train`.

  Args:
    tx: any Optax transformation; ``update`` is called with ``params``.
    task: a task, or a name for :func:`metatrain.tasks.get_task`.
    steps: training steps per seed.
    seeds: number of seeds; seed ``s`` uses the PRNG key ``seed_offset + s``.
    eval_every: steps between evaluations (default ``max(1, steps // 25)``).
    num_eval_batches: fixed training and validation batches per evaluation.
    data: the task's device data (default ``task.load_data()``).
    seed_offset: added to the seed index; keep it away from meta-training seeds.

  Returns:
    The run, as :func:`metatrain.measurement.train` returns it.

  Raises:
    ValueError: an unknown task name or a count that is not a positive integer.
  """
  task = tasks_lib.get_task(task) if isinstance(task, str) else task
  return measurement.train(tx, task, steps=steps, seeds=seeds, eval_every=eval_every,
                           num_eval_batches=num_eval_batches, data=data,
                           seed_offset=seed_offset)


def train_baseline(
    name: str,
    learning_rate: float,
    task: base.Task | str,
    **kwargs: Any,
) -> Run:
  """:func:`evaluate_transformation` of a baseline of :data:`BASELINES`.

  The learning rate is injected into the optimizer state, so all learning rates of a
  baseline share one compiled training step.

  Args:
    name: a key of :data:`BASELINES`.
    learning_rate: its learning rate.
    task: a task, or a name for :func:`metatrain.tasks.get_task`.
    **kwargs: the keyword arguments of :func:`evaluate_transformation`.

  Returns:
    The run, as :func:`evaluate_transformation` returns it.

  Raises:
    ValueError: an unknown baseline or task name, or a count that is not a positive integer.
  """
  if name not in BASELINES:
    raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
  task = tasks_lib.get_task(task) if isinstance(task, str) else task
  return measurement.train(_baseline(name, learning_rate), task,
                           train_step=_baseline_train_step(task, name), **kwargs)


# -- summary math -------------------------------------------------------------------------


def time_to_target(steps: Sequence[float], seconds: Sequence[float], losses: Sequence[float],
                   target: float) -> tuple[float | None, float | None]:
  """Step and seconds at which ``losses`` first reach ``target``, interpolated linearly.

  Args:
    steps: evaluation steps, increasing.
    seconds: cumulative training seconds at those steps.
    losses: the loss curve at those steps (NaN never reaches the target).
    target: the loss to reach.

  Returns:
    ``(step, seconds)``, or ``(None, None)`` if the curve never reaches ``target``.
  """
  steps, seconds, losses = float_array(steps), float_array(seconds), float_array(losses)
  chex.assert_equal_shape([steps, seconds, losses])
  if not math.isfinite(target):
    return None, None
  reached = np.flatnonzero(losses <= target)
  if reached.size == 0:
    return None, None
  i = int(reached[0])
  if i == 0 or not math.isfinite(losses[i - 1]):
    return float(steps[i]), float(seconds[i])
  fraction = (losses[i - 1] - target) / (losses[i - 1] - losses[i])  # in (0, 1]
  return (float(steps[i - 1] + fraction * (steps[i] - steps[i - 1])),
          float(seconds[i - 1] + fraction * (seconds[i] - seconds[i - 1])))


def stability(run: Run, total_steps: int) -> dict[str, Any]:
  """The ``diverged`` and ``stable`` flags of a run (see the module docstring)."""
  train = float_array(run["train_loss"])
  valid = float_array(run["valid_loss"])
  diverged = bool(not np.all(np.isfinite(train)) or not np.all(np.isfinite(valid)))
  mean_train = np.mean(train, axis=0)
  steps = np.asarray(run["steps"])
  reference = int(np.argmin(np.abs(steps - total_steps // 5)))
  stable = bool(not diverged
                and mean_train[-1] <= STABILITY_TOLERANCE * mean_train[reference])
  return {"diverged": diverged, "stable": stable, "reference_step": int(steps[reference]),
          "reference_train_loss": float(mean_train[reference])}


def final_metrics(run: Run) -> dict[str, Any]:
  """Final mean training loss, validation loss, accuracy and seconds per step of a run."""
  mean = run["mean"]
  return {"final_train_loss": _final(mean["train_loss"]),
          "final_valid_loss": _final(mean["valid_loss"]),
          "final_accuracy": _final(mean["accuracy"]) if "accuracy" in mean else None,
          "seconds_per_step": mean["seconds_per_step"]}


def best_learning_rate(runs: Mapping[float, Run]) -> float:
  """The learning rate whose run has the lowest final mean validation loss (NaN: worst)."""
  scores = {lr: _sort_key(final_metrics(run)["final_valid_loss"]) for lr, run in runs.items()}
  return min(scores, key=scores.get)


def compare(learned: Run, baseline: Run) -> dict[str, Any]:
  """Time to the baseline's final training loss, for both runs, and final metrics."""
  base_metrics, learned_metrics = final_metrics(baseline), final_metrics(learned)
  target = base_metrics["final_train_loss"]
  base_steps, base_seconds = time_to_target(
      baseline["steps"], baseline["mean"]["seconds"], baseline["mean"]["train_loss"], target)
  steps, seconds = time_to_target(
      learned["steps"], learned["mean"]["seconds"], learned["mean"]["train_loss"], target)
  return {
      "target_train_loss": target,
      "steps_to_target": steps, "seconds_to_target": seconds,
      "baseline_steps_to_target": base_steps, "baseline_seconds_to_target": base_seconds,
      "steps_ratio": _ratio(steps, base_steps), "seconds_ratio": _ratio(seconds, base_seconds),
      **learned_metrics,
      **{f"baseline_{k}": v for k, v in base_metrics.items()},
  }


# -- the full evaluation ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvaluationProtocol:
  """What :func:`evaluate` runs: the training runs, the tuning grids and the timing.

  Validated on construction (and by ``dataclasses.replace``).

  Attributes:
    steps: training steps per run.
    seeds: seeds per optimizer and learning rate (PRNG seeds ``EVAL_SEED_OFFSET + s``).
    eval_every: steps between evaluations (``None``: :func:`default_eval_every` of
      ``steps``; see :attr:`resolved_eval_every`).
    num_eval_batches: fixed training and validation batches per evaluation.
    baselines: keys of :data:`BASELINES`.
    learning_rates: one grid for every baseline, or a mapping from baseline to grid (a
      baseline it does not name gets its default); ``None``: :data:`DEFAULT_LEARNING_RATES`.
    timing_reps: rounds of the interleaved step-cost measurement (0: skip it).
    use_cache: read and write the baseline cache.

  Raises:
    ValueError: a count that is not a positive integer, an unknown baseline or an invalid
      grid.
  """
  steps: int = 1000
  seeds: int = 3
  eval_every: int | None = None
  num_eval_batches: int = DEFAULT_NUM_EVAL_BATCHES
  baselines: tuple[str, ...] = ("adam", "sgd_momentum", "rmsprop")
  learning_rates: LearningRates | None = None
  timing_reps: int = 20
  use_cache: bool = True

  def __post_init__(self):
    measurement.check_positive(steps=self.steps, seeds=self.seeds,
                               eval_every=self.resolved_eval_every,
                               num_eval_batches=self.num_eval_batches)
    object.__setattr__(self, "baselines", tuple(self.baselines))
    unknown = sorted(set(self.baselines) - set(BASELINES))
    if unknown:
      raise ValueError(f"unknown baseline(s) {unknown}; known: {sorted(BASELINES)}")
    self.grids()  # raises for an invalid grid

  @property
  def resolved_eval_every(self) -> int:
    """``eval_every``, or its default for ``steps``."""
    return default_eval_every(self.steps) if self.eval_every is None else self.eval_every

  def grids(self) -> dict[str, tuple[float, ...]]:
    """The sorted learning-rate grid of each baseline."""
    return {name: _grid(name, self.learning_rates) for name in self.baselines}

  def record(self) -> dict[str, Any]:
    """The ``protocol`` entry of the results, which also keys the baseline cache."""
    return {"steps": self.steps, "seeds": self.seeds, "eval_every": self.resolved_eval_every,
            "num_eval_batches": self.num_eval_batches,
            "eval_seeds": [EVAL_SEED_OFFSET + s for s in range(self.seeds)],
            "stability_tolerance": STABILITY_TOLERANCE}

  def train_kwargs(self) -> dict[str, Any]:
    """The keyword arguments of :func:`evaluate_transformation` for one run."""
    return {"steps": self.steps, "seeds": self.seeds, "eval_every": self.resolved_eval_every,
            "num_eval_batches": self.num_eval_batches}


def evaluate(
    optimizer: str | os.PathLike | None,
    task: str,
    *,
    out_dir: str | os.PathLike,
    protocol: EvaluationProtocol | None = None,
    data_dir: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    task_overrides: dict[str, Any] | None = None,
    load_kwargs: dict[str, Any] | None = None,
    **protocol_fields: Any,
) -> dict[str, Any]:
  """Evaluates a learned optimizer against baselines tuned over learning-rate grids.

  See the module docstring for the protocol.

  Args:
    optimizer: a bundled name or checkpoint path for :func:`optax_learned.load`, or ``None``
      to evaluate the baselines only.
    task: a task name (see :func:`metatrain.tasks.task_names`).
    out_dir: where ``results.json``, ``curves.json``, ``results.md``, ``loss_vs_step.png``
      and ``loss_vs_time.png`` are written (created if needed; see
      :func:`~metatrain.evaluation_report.write_outputs`).
    protocol: the runs, grids and timing (default ``EvaluationProtocol()``).
    data_dir: data source for tasks with a ``data_dir`` field (ignored by the others).
    cache_dir: the baseline cache (default :data:`DEFAULT_CACHE_DIR`).
    task_overrides: fields replaced in the task, e.g. ``{"batch_size": 64}``.
    load_kwargs: keyword arguments of :func:`optax_learned.load` for the learned optimizer,
      e.g. ``{"num_steps": 1000}`` (recorded in the results).
    **protocol_fields: fields of :class:`EvaluationProtocol` replaced in ``protocol``, e.g.
      ``steps=200, seeds=1`` (the keyword arguments ``evaluate`` has always taken).

  Returns:
    The results: ``task``, ``protocol``, ``environment``, ``learned`` (``None`` without
    ``optimizer``), ``baselines`` (per baseline: the grid, the runs per learning rate, the
    chosen one) and ``summary``. ``results.json`` holds them without the runs' curves, which
    ``curves.json`` holds (:func:`~metatrain.evaluation_report.read_results` joins them).

  Raises:
    TypeError: a keyword argument that is not a field of :class:`EvaluationProtocol`.
    ValueError: an unknown task or baseline, an invalid grid or non-positive counts.
  """
  protocol = _protocol(protocol, protocol_fields)
  grids = protocol.grids()
  overrides = dict(task_overrides or {})
  task_obj = tasks_lib.with_data_dir(tasks_lib.get_task(task, **overrides), data_dir)
  data = task_obj.load_data()
  cache = (pathlib.Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() if protocol.use_cache
           else None)
  record = protocol.record()
  train_kwargs = dict(protocol.train_kwargs(), data=data)

  # Load the learned optimizer first: a bad name or path fails before any training.
  load_kwargs = dict(load_kwargs or {})
  learned_tx = optax_learned.load(optimizer, **load_kwargs) if optimizer is not None else None
  baseline_results = {}
  for name in protocol.baselines:
    runs, cached = {}, []
    for lr in grids[name]:
      key = baseline_cache.cache_key(task, overrides, _task_config(task_obj), name, lr,
                                     record, schema_version=SCHEMA_VERSION)
      run = baseline_cache.read(cache, key) if cache else None
      cached.append(run is not None)
      if run is None:
        logger.info("training %s lr=%g on %s", name, lr, task)
        run = train_baseline(name, lr, task_obj, **train_kwargs)
        if cache:
          baseline_cache.write(cache, key, run)
      runs[lr] = run
    best = best_learning_rate(runs)
    baseline_results[name] = {
        "learning_rates": list(grids[name]),
        "best_learning_rate": best,
        "best_at_grid_edge": best in (grids[name][0], grids[name][-1]) and len(grids[name]) > 1,
        "final_valid_loss_by_lr": {lr_key(lr): final_metrics(r)["final_valid_loss"]
                                   for lr, r in runs.items()},
        "cached": cached,
        "runs": {lr_key(lr): r for lr, r in runs.items()},
    }

  learned = None
  if optimizer is not None:
    logger.info("training the learned optimizer %s on %s", optimizer, task)
    run = evaluate_transformation(learned_tx, task_obj, **train_kwargs)
    learned = {"optimizer": os.fspath(optimizer), "horizon": _horizon(optimizer),
               "load_kwargs": jsonable(load_kwargs), "run": run}
    if protocol.timing_reps:
      logger.info("timing the steps interleaved (%d rounds)", protocol.timing_reps)
      txs = {"learned": learned_tx, **{
          name: _baseline(name, b["best_learning_rate"]) for name, b in baseline_results.items()}}
      learned["step_seconds_interleaved"] = interleaved_step_seconds(
          txs, task_obj, data, protocol.timing_reps)

  results = {
      "schema_version": SCHEMA_VERSION,
      "task": {"name": task, "overrides": jsonable(overrides),
               "config": _task_config(task_obj)},
      "protocol": record,
      "environment": _environment(),
      "learned": learned,
      "baselines": baseline_results,
  }
  results["summary"] = summarize(results)
  write_outputs(results, out_dir)
  return results


def _protocol(protocol: EvaluationProtocol | None,
              fields: dict[str, Any]) -> EvaluationProtocol:
  """``protocol`` (default ``EvaluationProtocol()``) with ``fields`` replaced."""
  protocol = EvaluationProtocol() if protocol is None else protocol
  if not isinstance(protocol, EvaluationProtocol):
    raise TypeError(f"protocol must be an EvaluationProtocol, got {type(protocol).__name__}")
  known = {f.name for f in dataclasses.fields(EvaluationProtocol)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise TypeError(f"evaluate() got unexpected keyword argument(s) {unknown}; the protocol's "
                    f"fields are {sorted(known)}")
  return dataclasses.replace(protocol, **fields) if fields else protocol


def summarize(results: dict[str, Any]) -> dict[str, Any]:
  """The summary of :func:`evaluate`'s results: tuned baselines, best one, comparisons."""
  steps = results["protocol"]["steps"]
  tuned = {name: b["runs"][lr_key(b["best_learning_rate"])]
           for name, b in results["baselines"].items()}
  baselines = {}
  for name, run in tuned.items():
    metrics = final_metrics(run)
    reach = time_to_target(run["steps"], run["mean"]["seconds"], run["mean"]["train_loss"],
                           metrics["final_train_loss"])
    baselines[name] = {"learning_rate": results["baselines"][name]["best_learning_rate"],
                       **metrics, "steps_to_final_train_loss": reach[0],
                       "seconds_to_final_train_loss": reach[1], **stability(run, steps)}
  best = (min(baselines, key=lambda n: _sort_key(baselines[n]["final_valid_loss"]))
          if baselines else None)
  summary: dict[str, Any] = {"best_baseline": best, "baselines": baselines,
                             "learned": None, "comparisons": {}, "vs_best": None}
  if results["learned"] is not None:
    run = results["learned"]["run"]
    horizon = results["learned"]["horizon"]
    summary["learned"] = {**final_metrics(run), **stability(run, steps), "horizon": horizon,
                          "steps_exceed_horizon": None if horizon is None else steps > horizon}
    summary["comparisons"] = {name: compare(run, base) for name, base in tuned.items()}
    costs = results["learned"].get("step_seconds_interleaved")
    for name, comparison in summary["comparisons"].items():
      cost_ratio = _ratio(costs["learned"], costs[name]) if costs else None
      comparison["step_cost_ratio"] = cost_ratio
      comparison["interleaved_time_ratio"] = (
          None if cost_ratio is None or comparison["steps_ratio"] is None
          else comparison["steps_ratio"] * cost_ratio)
    if best is not None:
      summary["vs_best"] = {"baseline": best, **summary["comparisons"][best]}
  return summary


# -- helpers ------------------------------------------------------------------------------


def _grid(name: str, learning_rates: LearningRates | None) -> tuple[float, ...]:
  if learning_rates is None:
    grid = DEFAULT_LEARNING_RATES[name]
  elif isinstance(learning_rates, Mapping):
    grid = learning_rates.get(name, DEFAULT_LEARNING_RATES[name])
  else:
    grid = learning_rates
  grid = tuple(sorted(float(lr) for lr in grid))
  if not grid or any(not (math.isfinite(lr) and lr > 0) for lr in grid):
    raise ValueError(f"learning rates of {name} must be positive and finite, got {grid}")
  if len(set(grid)) != len(grid):
    raise ValueError(f"learning rates of {name} must be distinct, got {grid}")
  return grid


def _task_config(task: base.Task) -> dict[str, Any]:
  config = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name != "data_dir"}
  return jsonable({"class": type(task).__name__, **config})


def _horizon(optimizer: str | os.PathLike) -> int | None:
  """The meta-training ``max_horizon`` recorded in a checkpoint's metadata, if any."""
  try:
    config = optax_learned.load_metadata(optimizer).get("training_config") or {}
  except optax_learned.CheckpointError:
    return None
  if not isinstance(config, dict):
    return None
  horizon = (configs.nest_legacy_keys(config).get("truncation") or {}).get("max_horizon")
  return horizon if isinstance(horizon, int) and not isinstance(horizon, bool) else None


def _environment() -> dict[str, Any]:
  return {"package_version": optax_learned.__version__, "jax_version": jax.__version__,
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count(), "hostname": platform.node()}


def _final(curve: Sequence[float]) -> float:
  return float(float_array(curve)[-1])


def _sort_key(value: float) -> float:
  return value if math.isfinite(value) else math.inf


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None or b <= 0 else a / b
