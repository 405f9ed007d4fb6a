"""Measurement: the training step of a task, runs with fixed-batch evaluation, step timing.

The one implementation of what the evaluation (:mod:`metatrain.evaluation`) and the
benchmarks (``benchmarks/``) measure:

* :func:`make_train_step`: a jitted training step of a task and an Optax transformation. The
  batch of step ``t`` is sampled inside ``jit`` from ``fold_in(batch_key, t)``, the data is a
  device argument, and the step is called from a Python loop (:class:`TrainingLoop`), not
  ``lax.scan``: on XLA:CPU convolutions inside ``scan`` are much slower (jax-ml/jax#12868).
* :func:`train`: runs of several seeds. Seed ``s`` becomes the PRNG key ``seed_offset + s``,
  split into an initialisation key and a batch key. Every ``eval_every`` steps (and at steps
  0 and ``steps``) the parameters are evaluated on a fixed set of ``num_eval_batches``
  training batches ("training loss") and as many validation batches (validation loss and
  accuracy), the same for every transformation and seed (:func:`make_eval_fn`). The mean
  minibatch loss of the steps since the previous evaluation is kept too
  (``train_loss_window``). Wall-clock seconds count the training steps only: compilation
  happens in a two-step warm-up on copies of the initial state, and each chunk of steps is
  timed up to ``block_until_ready`` before the (untimed) evaluation. A run whose evaluated
  losses become NaN or infinite stops there; its remaining points are NaN and it is marked
  ``diverged``.
* :func:`interleaved_step_seconds` and :func:`interleaved_medians`: step costs timed in turn
  (:func:`metatrain.timing.interleaved_times`), so that changes in the machine's load hit
  every candidate alike.
"""

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metatrain import timing
from metatrain._json_io import float_array
from metatrain.tasks import base

__all__ = (
    "TrainingLoop",
    "check_positive",
    "default_eval_every",
    "eval_steps",
    "initial_state",
    "interleaved_medians",
    "interleaved_step_seconds",
    "make_eval_fn",
    "make_train_step",
    "mean_curves",
    "train",
    "train_seed",
)

logger = logging.getLogger(__name__)

# The first PRNG seed of evaluation runs; meta-training uses small seeds.
EVAL_SEED_OFFSET = 10_000
DEFAULT_NUM_EVAL_BATCHES = 10
# Steps per transformation per round of the interleaved step-cost measurement.
TIMING_STEPS = 10
# The fixed key of the evaluation batches (the same for every optimizer, seed and run).
_EVAL_BATCH_SEED = 987_654_321
# The curves of a run: one row per seed, one column per evaluation step.
CURVES = ("train_loss", "train_loss_window", "valid_loss", "accuracy", "seconds")

Run = dict[str, Any]
# ``(params, opt_state, loss_sum, step)``: what a training step threads.
TrainState = tuple[Any, Any, jax.Array, jax.Array]


# -- the training step ----------------------------------------------------------------------


def make_train_step(task: base.Task, tx: optax.GradientTransformation) -> Callable:
  """A jitted step ``(params, opt_state, loss_sum, t, batch_key, data) -> (.., loss_sum, t+1)``.

  The batch key of step ``t`` is ``fold_in(batch_key, t)``; ``loss_sum`` accumulates the
  minibatch losses on the device so that a loop never waits for them. The step donates its
  state (the first four arguments).

  Args:
    task: the task trained.
    tx: any Optax transformation; ``update`` is called with ``params``.

  Returns:
    The jitted step.
  """

  def step(params, opt_state, loss_sum, t, batch_key, data):
    batch = task.sample_batch(data, jax.random.fold_in(batch_key, t), "train")
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    chex.assert_rank(loss, 0)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss_sum + loss, t + 1

  return jax.jit(step, donate_argnums=(0, 1, 2, 3))


def initial_state(task: base.Task, tx: optax.GradientTransformation,
                  init_key: chex.PRNGKey) -> TrainState:
  """The state of :func:`make_train_step` at step 0, in fresh buffers (the step donates it).

  Args:
    task: the task trained.
    tx: the transformation.
    init_key: the key of ``task.init_params``.

  Returns:
    ``(params, opt_state, loss_sum=0, step=0)``.
  """
  params = task.init_params(init_key)
  # Copies: the step donates its inputs, and an initial state may share buffers.
  return jax.tree.map(jnp.copy, (params, tx.init(params), jnp.zeros([], jnp.float32),
                                 jnp.zeros([], jnp.int32)))


@dataclasses.dataclass
class TrainingLoop:
  """A training step called from a Python loop, ``num_steps`` steps per call.

  Attributes:
    step: a step of :func:`make_train_step`.
    state: the state it threads (:func:`initial_state`), replaced by every call.
    batch_key: the key the batches are folded from.
    data: the task's device data.
    num_steps: steps per call.
  """
  step: Callable
  state: TrainState
  batch_key: chex.PRNGKey
  data: base.Data
  num_steps: int = 1

  @classmethod
  def create(cls, task: base.Task, tx: optax.GradientTransformation, data: base.Data,
             key: chex.PRNGKey, *, num_steps: int = 1,
             train_step: Callable | None = None) -> "TrainingLoop":
    """A loop from a run's key: split into the initialisation key and the batch key.

    Args:
      task: the task trained.
      tx: the transformation.
      data: the task's device data.
      key: the run's PRNG key.
      num_steps: steps per call.
      train_step: the jitted step (default ``make_train_step(task, tx)``).

    Returns:
      The loop at step 0.
    """
    init_key, batch_key = jax.random.split(key)
    train_step = make_train_step(task, tx) if train_step is None else train_step
    return cls(train_step, initial_state(task, tx, init_key), batch_key, data, num_steps)

  def __call__(self) -> TrainState:
    """Runs ``num_steps`` steps (asynchronously) and returns the new state."""
    state = self.state
    for _ in range(self.num_steps):
      state = self.step(*state, self.batch_key, self.data)
    self.state = state
    return state

  def warm_up(self) -> None:
    """Compiles the step for the state and for its outputs (which may differ in weak types).

    Two steps run on copies, and ``state`` is left as it was.
    """
    state = self.state
    for _ in range(2):
      state = self.step(*jax.tree.map(jnp.copy, state), self.batch_key, self.data)
    jax.block_until_ready(state)


# -- runs with fixed-batch evaluation -------------------------------------------------------


@functools.lru_cache(maxsize=16)
def make_eval_fn(task: base.Task, num_batches: int) -> Callable:
  """Jitted ``(params, data) -> {train_loss, valid_loss, accuracy}`` on fixed batches.

  Args:
    task: the task (hashable: the function is cached per task).
    num_batches: training and validation batches, the same for every call.

  Returns:
    The jitted function; ``accuracy`` is ``None`` for tasks without one.
  """
  keys = jax.random.split(jax.random.key(_EVAL_BATCH_SEED), num_batches)

  def evaluate_params(params, data):
    def on_batch(key, split):
      batch = task.sample_batch(data, key, split)
      return task.loss(params, batch), task.accuracy(params, batch)

    train_loss, _ = jax.vmap(lambda k: on_batch(k, "train"))(keys)
    valid_loss, accuracy = jax.vmap(lambda k: on_batch(k, "valid"))(keys)
    return {"train_loss": jnp.mean(train_loss), "valid_loss": jnp.mean(valid_loss),
            "accuracy": None if accuracy is None else jnp.mean(accuracy)}

  return jax.jit(evaluate_params)


def default_eval_every(steps: int) -> int:
  """The default evaluation interval: 25 evaluations after the initial one."""
  return max(1, steps // 25)


def eval_steps(steps: int, eval_every: int) -> list[int]:
  """The steps at which a run is evaluated: 0, every ``eval_every`` steps, and ``steps``."""
  points = list(range(0, steps, eval_every))
  return points + [steps]


def train(tx: optax.GradientTransformation, task: base.Task, *, steps: int = 1000,
          seeds: int = 3, eval_every: int | None = None,
          num_eval_batches: int = DEFAULT_NUM_EVAL_BATCHES, data: base.Data | None = None,
          seed_offset: int = EVAL_SEED_OFFSET, train_step: Callable | None = None) -> Run:
  """Trains ``task`` with ``tx`` from several seeds and records learning curves.

  Args:
    tx: any Optax transformation; ``update`` is called with ``params``.
    task: the task.
    steps: training steps per seed.
    seeds: number of seeds; seed ``s`` uses the PRNG key ``seed_offset + s``.
    eval_every: steps between evaluations (default :func:`default_eval_every`).
    num_eval_batches: fixed training and validation batches per evaluation.
    data: the task's device data (default ``task.load_data()``).
    seed_offset: added to the seed index; keep it away from meta-training seeds.
    train_step: the jitted step of ``tx`` (default ``make_train_step(task, tx)``; one step
      can serve several transformations whose hyperparameters live in their state).

  Returns:
    A JSON-serialisable dict: ``steps`` (evaluation steps), ``seeds`` (PRNG seeds),
    per-seed lists (one row per seed, one column per evaluation step) ``train_loss``,
    ``train_loss_window`` (mean minibatch loss since the previous evaluation; NaN at step 0),
    ``valid_loss``, ``accuracy`` (``None`` for tasks without accuracy) and ``seconds``
    (cumulative training wall-clock); per seed ``seconds_per_step`` and ``diverged``;
    ``compile_seconds`` (the warm-up); and ``mean``, the means over seeds of the curves
    and of ``seconds_per_step``. Values after a divergence are NaN.

  Raises:
    ValueError: a count that is not a positive integer.
  """
  eval_every = default_eval_every(steps) if eval_every is None else eval_every
  check_positive(steps=steps, seeds=seeds, eval_every=eval_every,
                 num_eval_batches=num_eval_batches)
  train_step = make_train_step(task, tx) if train_step is None else train_step
  data = task.load_data() if data is None else data
  points = eval_steps(steps, eval_every)
  evaluate_params = make_eval_fn(task, num_eval_batches)

  # Warm-up: compiles the step and the evaluation.
  start = time.perf_counter()
  loop = TrainingLoop.create(task, tx, data, jax.random.key(seed_offset), train_step=train_step)
  loop.warm_up()
  jax.block_until_ready(evaluate_params(loop.state[0], data))
  compile_seconds = time.perf_counter() - start

  records = [train_seed(task, tx, train_step, evaluate_params, data, points, seed_offset + s)
             for s in range(seeds)]
  run: Run = {key: [r[key] for r in records] for key in records[0]}
  run = {"steps": points, "seeds": run.pop("seed"), **run, "compile_seconds": compile_seconds}
  if all(a is None for a in run["accuracy"]):
    run["accuracy"] = None
  run["mean"] = mean_curves(run)
  return run


def train_seed(task: base.Task, tx: optax.GradientTransformation, train_step: Callable,
               evaluate_params: Callable, data: base.Data, points: list[int],
               seed: int) -> dict[str, Any]:
  """One seed's curves (see :func:`train`).

  Args:
    task: the task.
    tx: the transformation.
    train_step: its jitted step (:func:`make_train_step`).
    evaluate_params: the evaluation (:func:`make_eval_fn`).
    data: the task's device data.
    points: the evaluation steps (:func:`eval_steps`).
    seed: the PRNG seed of the run.

  Returns:
    ``seed``, the curves of :data:`CURVES` (``accuracy`` is ``None`` without one),
    ``seconds_per_step`` and ``diverged``.
  """
  loop = TrainingLoop.create(task, tx, data, jax.random.key(seed), train_step=train_step)
  chex.assert_tree_all_finite(loop.state[0])
  nan = float("nan")
  curves = {name: [nan] * len(points) for name in CURVES}
  seconds, has_accuracy, diverged, done = 0.0, True, False, 0

  for i, point in enumerate(points):
    if i > 0:
      params, opt_state, _, t = loop.state
      loop.state = (params, opt_state, jnp.zeros([], jnp.float32), t)
      loop.num_steps = point - points[i - 1]
      start = time.perf_counter()
      jax.block_until_ready(loop())
      seconds += time.perf_counter() - start
      done = point
      curves["train_loss_window"][i] = float(loop.state[2]) / loop.num_steps
    metrics = jax.device_get(evaluate_params(loop.state[0], data))
    curves["seconds"][i] = seconds
    curves["train_loss"][i] = float(metrics["train_loss"])
    curves["valid_loss"][i] = float(metrics["valid_loss"])
    has_accuracy = metrics["accuracy"] is not None
    if has_accuracy:
      curves["accuracy"][i] = float(metrics["accuracy"])
    if not (math.isfinite(curves["train_loss"][i]) and math.isfinite(curves["valid_loss"][i])):
      diverged = True
      logger.info("seed %d diverged at step %d; stopping this run", seed, point)
      break

  return {"seed": seed, **curves, "accuracy": curves["accuracy"] if has_accuracy else None,
          "seconds_per_step": seconds / done if done else nan, "diverged": diverged}


def mean_curves(run: Run) -> dict[str, Any]:
  """Means over seeds of a run's curves (lists) and of its ``seconds_per_step`` (a float)."""
  means = {}
  for name in CURVES:
    if run.get(name) is not None:
      means[name] = np.mean(float_array(run[name]), axis=0).tolist()
  means["seconds_per_step"] = float(np.mean(float_array(run["seconds_per_step"])))
  return means


# -- interleaved timing ---------------------------------------------------------------------


def interleaved_medians(fns: dict[str, Callable[[], Any]], reps: int,
                        warmup: int = 1) -> dict[str, float]:
  """Median seconds per call of each thunk, called in turn.

  Args:
    fns: thunks by name (see :func:`metatrain.timing.interleaved_times`).
    reps: timed calls of each thunk.
    warmup: untimed rounds first.

  Returns:
    The median seconds per call, by name.
  """
  return {name: median for name, (median, _) in
          timing.interleaved_times(fns, reps=reps, warmup=warmup).items()}


def interleaved_step_seconds(txs: dict[str, optax.GradientTransformation], task: base.Task,
                             data: base.Data, reps: int, steps: int | None = None
                             ) -> dict[str, float]:
  """Median seconds per training step of each transformation, timed in turn.

  Each round times ``steps`` (default :data:`TIMING_STEPS`) steps of every transformation one
  after another, so that changes in the machine's load hit all of them alike.

  Args:
    txs: the transformations by name.
    task: the task they train.
    data: its device data.
    reps: timed rounds (after one untimed warm-up round).
    steps: steps per transformation per round.

  Returns:
    The median over rounds of seconds per step, by name.

  Raises:
    ValueError: ``reps`` or ``steps`` not a positive integer.
  """
  steps = TIMING_STEPS if steps is None else steps
  check_positive(reps=reps, steps=steps)
  key = jax.random.key(EVAL_SEED_OFFSET)
  loops = {name: TrainingLoop(make_train_step(task, tx), initial_state(task, tx, key), key,
                              data, steps) for name, tx in txs.items()}
  return {name: seconds / steps for name, seconds in interleaved_medians(loops, reps).items()}


# -- helpers --------------------------------------------------------------------------------


def check_positive(**values: int) -> None:
  """Raises ``ValueError("NAME must be a positive integer, got VALUE")`` for a bad count.

  Args:
    **values: counts by name; ``bool`` is not a count.

  Raises:
    ValueError: the first value that is not an ``int`` of at least 1.
  """
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
