"""Truncated unrolls of inner training, vectorised over task instances.

Inner training runs persist across truncations: each particle carries an :class:`InnerState`
(parameters, optimizer state, step within its run, the run's horizon and its PRNG key). A run
resets when it reaches its horizon or after it diverged; the reset happens at the start of a
step and is reported per step, so estimators can mask what came before it. Horizons are drawn
from a fixed or log-uniform schedule, and the first horizon of each instance is shortened by a
uniform fraction so that instances do not reset in lockstep.

Antithetic partners share ``run_key`` and therefore initial parameters, batches and horizons.

Truncations may grow during meta-training (Metz et al. 2019 grow them from 10 steps towards
the full inner horizon): with ``max_segments > 1`` a meta-step unrolls ``K`` consecutive
segments of ``length`` steps (:func:`unroll_segments`), ``K`` following
:func:`scheduled_segments`. One compiled function serves every ``K``: segments past ``K`` are
skipped by ``lax.cond`` and masked out of the outputs (``measured``), and each segment is
rematerialised in the backward pass, so pathwise gradients store one segment's intermediates.

References:
  Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
  optimizers", ICML. arXiv:1810.10180.
"""

import dataclasses
import functools
from typing import Any, NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp
import optax

from metatrain.tasks import base

__all__ = ("InnerState", "LearnedOptimizerLike", "TruncationConfig", "UnrollOutput", "diverged",
           "force_reset", "init_inner_state", "masked_mean", "meta_loss_term",
           "resets_before_measurements", "sample_horizon", "scheduled_segments", "unroll",
           "unroll_segments")

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
    max_segments: truncations grow up to ``max_segments * length`` inner steps, in segments
      of ``length`` (:func:`unroll_segments`); 1: every truncation is ``length`` steps.
    growth_steps: meta-steps over which the number of segments grows linearly from 1 to
      ``max_segments`` (0: ``max_segments`` from the first meta-step).
    jitter: the scheduled number of segments is multiplied by a uniform factor in
      ``[1 - jitter, 1 + jitter]`` before rounding (Metz et al. 2019 use 0.2), so that
      truncation ends do not line up across meta-steps.
    late_weight_power: each meta-loss measurement is weighted by ``(t / horizon) **
      late_weight_power``, ``t`` the steps its run has taken: 0 (the default) weighs the
      whole inner run alike (the mean over the unroll of Metz et al. 2019); larger values
      move the objective towards the end of each run, the loss a user sees when training
      stops. The weight depends on the run's step and horizon, not on the optimizer
      weights, so PES stays unbiased for the weighted objective.

  References:
    Metz et al. 2019, arXiv:1810.10180, Appendix (the unroll-length schedule).
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
  max_segments: int = 1
  growth_steps: int = 0
  jitter: float = 0.0
  late_weight_power: float = 0.0

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
    if self.max_segments < 1 or self.growth_steps < 0:
      raise ValueError(f"truncation.max_segments must be >= 1 and truncation.growth_steps >= 0, "
                       f"got {self.max_segments} and {self.growth_steps}")
    if not 0.0 <= self.jitter < 1.0:
      raise ValueError(f"truncation.jitter must be in [0, 1), got {self.jitter}")
    if not 0.0 <= self.late_weight_power < float("inf"):
      raise ValueError(
          f"truncation.late_weight_power must be finite and >= 0, got {self.late_weight_power}")

  @property
  def max_length(self) -> int:
    """The longest truncation, ``max_segments * length`` inner steps."""
    return self.max_segments * self.length


class InnerState(NamedTuple):
  """One inner training run in progress (leading axis: particles, when batched)."""
  params: Any
  opt_state: Any
  step: jax.Array       # int32: steps taken in this run
  horizon: jax.Array    # int32: length of this run
  run_key: jax.Array    # uint32[2]: seeds this run's init, batches and next run


class UnrollOutput(NamedTuple):
  """Outputs of :func:`unroll` and :func:`unroll_segments`.

  ``meta_losses`` and ``measured`` have one entry per measurement (``[length //
  meta_loss_every]`` per segment), the others one per step (``[length]`` per segment).
  Entries of skipped segments are zero (``False``) and not ``measured``.
  """
  meta_losses: jax.Array   # the (clipped, optionally log) meta-loss at each measurement
  train_losses: jax.Array  # the raw training loss of each step
  resets: jax.Array        # bool: a new run started at the start of this step
  measured: jax.Array      # bool: this measurement was taken (its segment ran)


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
  if resets.shape[-1] % config.length:
    raise ValueError(f"resets must cover whole segments of {config.length} steps, got "
                     f"{resets.shape[-1]}")
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
  fresh batch of ``config.meta_loss_split`` (weighted as ``config.late_weight_power``
  says). Steps run in ``lax.scan`` (nested: windows of
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
    term = meta_loss_term(config, meta_loss)
    if config.late_weight_power:
      progress = state.step.astype(jnp.float32) / state.horizon.astype(jnp.float32)
      term = term * progress ** config.late_weight_power
    return state, (term, train_losses, resets)

  num_windows = config.length // config.meta_loss_every
  state, (meta_losses, train_losses, resets) = jax.lax.scan(window, state, length=num_windows)
  return state, UnrollOutput(meta_losses, train_losses.reshape(-1), resets.reshape(-1),
                             jnp.ones(meta_losses.shape, bool))


def masked_mean(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
  """The mean of ``values`` where ``mask`` holds (over ``axis``; all axes if ``None``)."""
  return jnp.sum(jnp.where(mask, values, 0.0), axis=axis) / jnp.maximum(
      jnp.sum(mask, axis=axis), 1)


def scheduled_segments(config: TruncationConfig, step: jax.Array,
                       key: chex.PRNGKey) -> jax.Array:
  """The number of segments of meta-step ``step`` (int32 scalar in ``[1, max_segments]``).

  It grows linearly from 1 at step 0 to ``max_segments`` at ``growth_steps``, then stays;
  with ``jitter`` it is multiplied by a uniform factor drawn from ``key`` before rounding.

  References:
    Metz et al. 2019, arXiv:1810.10180: unroll lengths grow linearly towards the full
    inner horizon, jittered by 0.8-1.2x.
  """
  if config.max_segments == 1:
    return jnp.ones([], jnp.int32)
  progress = (jnp.minimum(jnp.asarray(step, jnp.float32) / config.growth_steps, 1.0)
              if config.growth_steps else 1.0)
  target = 1.0 + (config.max_segments - 1) * progress
  if config.jitter:
    target = target * jax.random.uniform(key, (), minval=1.0 - config.jitter,
                                         maxval=1.0 + config.jitter)
  return jnp.clip(jnp.round(target), 1, config.max_segments).astype(jnp.int32)


def unroll_segments(task: base.Task, lopt: LearnedOptimizerLike, config: TruncationConfig,
                    meta_params: MetaParams, state: InnerState, data: base.Data,
                    num_segments: jax.Array | int = 1) -> tuple[InnerState, UnrollOutput]:
  """Runs ``num_segments`` consecutive segments of :func:`unroll` (one truncation).

  With ``config.max_segments == 1`` this is :func:`unroll`. Otherwise ``lax.scan`` runs
  ``max_segments`` slots, each a rematerialised :func:`unroll` under ``lax.cond``: slots past
  ``num_segments`` are skipped (the state passes through, their outputs are zero and not
  ``measured``). ``num_segments`` must be the same for every particle (unbatched), so that
  the ``cond`` stays a branch under ``vmap``.

  Args:
    task: the inner problem.
    lopt: the learned optimizer.
    config: truncation settings.
    meta_params: the optimizer weights.
    state: the run in progress (unbatched).
    data: the task's arrays.
    num_segments: segments to run, in ``[1, config.max_segments]`` (may be traced).

  Returns:
    The state after ``num_segments * config.length`` steps and the outputs, with
    ``max_segments`` segments' entries.
  """
  if config.max_segments == 1:
    return unroll(task, lopt, config, meta_params, state, data)
  segment = jax.checkpoint(functools.partial(unroll, task, lopt, config))
  shapes = jax.eval_shape(segment, meta_params, state, data)[1]

  def slot(state, index):
    run = lambda s: segment(meta_params, s, data)
    skip = lambda s: (s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
    return jax.lax.cond(index < num_segments, run, skip, state)

  state, outputs = jax.lax.scan(slot, state, jnp.arange(config.max_segments))
  return state, jax.tree.map(lambda x: x.reshape(-1), outputs)


def diverged(config: TruncationConfig, output: UnrollOutput) -> jax.Array:
  """Whether a truncation's training losses show a diverging run (bool scalar)."""
  losses = output.train_losses
  return jnp.any(~jnp.isfinite(losses) | (losses > config.divergence_loss))


def force_reset(state: InnerState, mask: jax.Array) -> InnerState:
  """Makes runs where ``mask`` holds reset at their next step (by ending their horizon)."""
  return state._replace(horizon=jnp.where(mask, jnp.minimum(state.horizon, state.step),
                                          state.horizon))
