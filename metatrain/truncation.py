"""Truncated unrolls of inner training, vectorised over task instances.

Inner training runs persist across truncations: each particle carries an :class:`InnerState`
(parameters, optimizer state, step within its run, the run's horizon and its PRNG key). A run
resets when it reaches its horizon or after it diverged; the reset happens at the start of a
step and is reported per step, so estimators can mask what came before it. Horizons are drawn
from a fixed or log-uniform schedule, and the first horizon of each instance is shortened by a
uniform fraction so that instances do not reset in lockstep.

Antithetic partners share ``run_key`` and therefore initial parameters, batches and horizons.

References:
  Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
  optimizers", ICML. arXiv:1810.10180.
"""

import dataclasses
from typing import Any, NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp
import optax

from metatrain.tasks import base

__all__ = ("InnerState", "LearnedOptimizerLike", "TruncationConfig", "UnrollOutput", "diverged",
           "force_reset", "init_inner_state", "meta_loss_term", "resets_before_measurements",
           "sample_horizon", "unroll")

MetaParams = Any


class LearnedOptimizerLike(Protocol):
  """What meta-training needs of a learned optimizer (e.g. optax_learned.LearnedOptimizer)."""

  def init(self, key: chex.PRNGKey) -> MetaParams: ...

  def transform(self, meta_params: MetaParams) -> optax.GradientTransformationExtraArgs: ...


@dataclasses.dataclass(frozen=True)
class TruncationConfig:
  """How inner training is unrolled and scored (``truncation.*`` of a run config).

  Attributes:
    length: inner steps per truncation (per meta-gradient estimate).
    min_horizon: shortest inner run, in steps.
    max_horizon: longest inner run; equal to ``min_horizon`` for a fixed horizon, otherwise
      horizons are log-uniform in ``[min_horizon, max_horizon]``.
    meta_loss_split: ``"valid"`` (the paper's recommendation) or ``"train"``: which split the
      meta-loss is measured on.
    meta_loss_every: the meta-loss is measured after every ``meta_loss_every``-th inner step
      (it must divide ``length``). 1 measures after every step; larger values
      estimate the same mean over the run from fewer, evenly spaced measurements and skip the
      cost of the other validation passes.
    remat: recompute each inner step's intermediates in the backward pass
      (``jax.checkpoint``) instead of storing them: the pathwise gradient then stores only the
      inner state per step, at the cost of a second forward pass.
    log_loss: meta-train on ``log(loss)`` rather than the loss.
    loss_clip: the per-step loss is clipped at this value (and non-finite losses replaced by
      it) before the log, so diverging runs give bounded meta-losses.
    divergence_loss: an inner run whose training loss exceeds this (or is not finite) is
      reset at the start of the next truncation and counted as diverged.
    stagger: shorten each instance's first run by a uniform fraction so that instances
      started together do not reset in lockstep.
  """
  length: int = 20
  min_horizon: int = 200
  max_horizon: int = 2000
  meta_loss_split: str = "valid"
  log_loss: bool = True
  loss_clip: float = 5.0
  divergence_loss: float = 1e4
  stagger: bool = True
  meta_loss_every: int = 1
  remat: bool = False

  def __post_init__(self):
    if self.length < 1:
      raise ValueError(f"truncation.length must be >= 1, got {self.length}")
    if self.meta_loss_every < 1 or self.length % self.meta_loss_every:
      raise ValueError(
          f"truncation.meta_loss_every must be a positive divisor of truncation.length "
          f"({self.length}), got {self.meta_loss_every}")
    if not self.length <= self.min_horizon <= self.max_horizon:
      raise ValueError(
          "need truncation.length <= min_horizon <= max_horizon, got "
          f"{self.length}, {self.min_horizon}, {self.max_horizon}")
    base.check_split(self.meta_loss_split)
    if self.loss_clip <= 0:
      raise ValueError(f"truncation.loss_clip must be positive, got {self.loss_clip}")


class InnerState(NamedTuple):
  """One inner training run in progress (leading axis: particles, when batched)."""
  params: Any
  opt_state: Any
  step: jax.Array       # int32: steps taken in this run
  horizon: jax.Array    # int32: length of this run
  run_key: jax.Array    # uint32[2]: seeds this run's init, batches and next run


class UnrollOutput(NamedTuple):
  """Outputs of :func:`unroll`.

  ``meta_losses`` has one entry per measurement (``[length // meta_loss_every]``),
  the others one per step (``[length]``).
  """
  meta_losses: jax.Array   # the (clipped, optionally log) meta-loss at each measurement
  train_losses: jax.Array  # the raw training loss of each step
  resets: jax.Array        # bool: a new run started at the start of this step


def resets_before_measurements(config: TruncationConfig, resets: jax.Array) -> jax.Array:
  """Whether a run reset at or before each measurement's step, within its window.

  Args:
    config: truncation settings.
    resets: per-step reset flags ``[..., length]``.

  Returns:
    ``[..., length // meta_loss_every]``: measurement ``j`` (after step
    ``(j + 1) * meta_loss_every - 1``) is true when a reset happened in its window of steps,
    so that a cumulative "any" over measurements tells which ones follow a reset.
  """
  chex.assert_axis_dimension(resets, -1, config.length)
  windows = resets.reshape(resets.shape[:-1] + (-1, config.meta_loss_every))
  return jnp.any(windows, axis=-1)


def sample_horizon(config: TruncationConfig, key: chex.PRNGKey) -> jax.Array:
  """Draws an inner-run length from the horizon schedule (int32 scalar)."""
  if config.min_horizon == config.max_horizon:
    return jnp.asarray(config.min_horizon, jnp.int32)
  log_h = jax.random.uniform(key, (), minval=jnp.log(config.min_horizon),
                             maxval=jnp.log(config.max_horizon + 1))
  return jnp.clip(jnp.floor(jnp.exp(log_h)), config.min_horizon, config.max_horizon).astype(
      jnp.int32)


def _fresh_run(task: base.Task, tx: optax.GradientTransformation, config: TruncationConfig,
               run_key: jax.Array) -> InnerState:
  init_key, horizon_key = jax.random.split(jax.random.fold_in(run_key, 0))
  params = task.init_params(init_key)
  return InnerState(params=params, opt_state=tx.init(params), step=jnp.zeros([], jnp.int32),
                    horizon=sample_horizon(config, horizon_key), run_key=run_key)


def init_inner_state(task: base.Task, lopt: LearnedOptimizerLike, meta_params: MetaParams,
                     config: TruncationConfig, key: chex.PRNGKey) -> InnerState:
  """Starts one inner run, with its first horizon shortened if ``config.stagger``.

  The staggered first horizon is a uniform fraction of a sampled horizon (at least one
  truncation), so that a batch of instances started together does not reset together.
  """
  run_key, stagger_key = jax.random.split(key)
  state = _fresh_run(task, lopt.transform(meta_params), config, run_key)
  if not config.stagger:
    return state
  fraction = jax.random.uniform(stagger_key)
  first = jnp.maximum(config.length,
                      jnp.ceil(fraction * state.horizon).astype(jnp.int32))
  return state._replace(horizon=first)


def meta_loss_term(config: TruncationConfig, loss: jax.Array) -> jax.Array:
  """The per-step meta-loss: clipped (non-finite counts as the clip), optionally logged."""
  clipped = jnp.where(jnp.isfinite(loss), jnp.minimum(loss, config.loss_clip), config.loss_clip)
  return jnp.log(jnp.maximum(clipped, 1e-8)) if config.log_loss else clipped


def unroll(task: base.Task, lopt: LearnedOptimizerLike, config: TruncationConfig,
           meta_params: MetaParams, state: InnerState, data: base.Data
           ) -> tuple[InnerState, UnrollOutput]:
  """Runs one truncation of inner training with the learned optimizer at ``meta_params``.

  Each step first resets the run if it reached its horizon, then takes a training step on a
  train batch. After every ``config.meta_loss_every``-th step the meta-loss is measured on a
  fresh batch of ``config.meta_loss_split``. Steps run in ``lax.scan`` (nested: windows of
  ``meta_loss_every`` steps, each followed by one measurement).

  Args:
    task: the inner problem.
    lopt: the learned optimizer (only ``transform`` is used).
    config: truncation settings.
    meta_params: the optimizer weights (possibly perturbed, possibly traced).
    state: the run in progress (unbatched; ``vmap`` this function over particles).
    data: the task's arrays.

  Returns:
    The state after ``config.length`` steps and the outputs.
  """
  tx = lopt.transform(meta_params)
  # A run resets at most once per truncation (every horizon is at least length
  # steps), and its run key changes only when it resets, so the run it would reset to can be
  # drawn once, here, instead of at every step.
  fresh = _fresh_run(task, tx, config, jax.random.split(state.run_key)[1])

  def train_step(state: InnerState, _):
    reset = state.step >= state.horizon
    state = jax.tree.map(lambda new, old: jnp.where(reset, new, old), fresh, state)
    batch_key = jax.random.fold_in(jax.random.fold_in(state.run_key, 1), state.step)
    train_key, meta_key = jax.random.split(batch_key)
    train_loss, grads = jax.value_and_grad(task.loss)(
        state.params, task.sample_batch(data, train_key, "train"))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state._replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, (train_loss, reset, meta_key)

  if config.remat:
    train_step = jax.checkpoint(train_step)

  def window(state: InnerState, _):
    state, (train_losses, resets, meta_keys) = jax.lax.scan(
        train_step, state, length=config.meta_loss_every)
    meta_loss = task.loss(state.params,
                          task.sample_batch(data, meta_keys[-1], config.meta_loss_split))
    return state, (meta_loss_term(config, meta_loss), train_losses, resets)

  num_windows = config.length // config.meta_loss_every
  state, (meta_losses, train_losses, resets) = jax.lax.scan(window, state, length=num_windows)
  return state, UnrollOutput(meta_losses, train_losses.reshape(-1), resets.reshape(-1))


def diverged(config: TruncationConfig, output: UnrollOutput) -> jax.Array:
  """Whether a truncation's training losses show a diverging run (bool scalar)."""
  losses = output.train_losses
  return jnp.any(~jnp.isfinite(losses) | (losses > config.divergence_loss))


def force_reset(state: InnerState, mask: jax.Array) -> InnerState:
  """Makes runs where ``mask`` holds reset at their next step (by ending their horizon)."""
  return state._replace(horizon=jnp.where(mask, jnp.minimum(state.horizon, state.step),
                                          state.horizon))
