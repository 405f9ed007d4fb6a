"""The evolution-strategies side: antithetic ES, persistent ES (PES) and noise-reuse ES.

Both are zeroth-order: from the meta-losses of antithetic pairs ``theta +- eps_i`` they give
per-sample gradients of the Gaussian-smoothed meta-objective ``E_eps[L(theta + eps)]``. An ES
side is a small object with three methods, so a new one (e.g. noise-reuse ES) is one class
and one entry of :data:`metatrain.estimators.ES_SIDES`:

* ``init(positive, meta_params)``: its state (``()`` when it keeps none);
* ``perturbation(state, fresh)``: the perturbations of this truncation, given fresh draws
  (a side that keeps its perturbations across truncations returns its own);
* ``samples(unroll, pair, state, sigma, truncation)``: unrolls the negative half of ``pair``
  and returns ``(per-sample gradients, new state, negative outputs)``;
* ``reset(state, mask)``: restarts the runs it keeps where ``mask`` holds (divergences).

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein 2019. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML. arXiv:1810.10180.
  Vicol, Metz, Sohl-Dickstein 2021. "Unbiased gradient estimation in unrolled computation
  graphs with persistent evolution strategies". ICML. arXiv:2112.13835.
  Li, Harrison, Sohl-Dickstein, Smith, Metz 2023. "Variance-reduced gradient estimation via
  noise-reuse in online evolution strategies". NeurIPS. arXiv:2304.12180.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp

from metatrain import truncation as truncation_lib

MetaParams = Any
Unroll = Callable[[MetaParams, truncation_lib.InnerState],
                  tuple[truncation_lib.InnerState, truncation_lib.UnrollOutput]]

__all__ = ("Antithetic", "AntitheticES", "ESSide", "NoiseReuseES", "NoiseReuseESState",
           "PersistentES", "PersistentESState", "antithetic_es_gradient", "pes_gradient")


def antithetic_es_gradient(eps: MetaParams, loss_differences: jax.Array,
                           sigma: float) -> MetaParams:
  """Per-sample antithetic ES gradients ``eps_i (L(theta+eps_i) - L(theta-eps_i)) / (2 sigma^2)``.

  Args:
    eps: perturbations, each leaf with a leading sample axis ``[S, ...]``.
    loss_differences: ``L+ - L-`` per sample, shape ``[S]``.
    sigma: the smoothing scale.

  Returns:
    Per-sample gradient estimates shaped like ``eps``.
  """
  scale = loss_differences / (2.0 * sigma**2)
  return jax.tree.map(lambda e: e * scale.reshape((-1,) + (1,) * (e.ndim - 1)), eps)


def pes_gradient(eps: MetaParams, accumulated: MetaParams, step_differences: jax.Array,
                 resets: jax.Array, sigma: float, measured: jax.Array | None = None
                 ) -> tuple[MetaParams, MetaParams]:
  """Per-sample persistent ES gradients and the new accumulated perturbations.

  The loss difference of measurement ``m`` is attributed to every perturbation that shaped the
  run up to it: the current ``eps`` always, the accumulated ones only if the run has not reset
  at or before ``m`` within this truncation.

  Args:
    eps: this truncation's perturbations ``[S, ...]``.
    accumulated: the sum of earlier perturbations since each run's last reset ``[S, ...]``.
    step_differences: ``l+_m - l-_m`` per sample and meta-loss measurement, ``[S, M]``.
    resets: bool ``[S, M]``: a new run started since the previous measurement (at or before
      measurement ``m``); see :func:`metatrain.truncation.resets_before_measurements`.
    sigma: the smoothing scale.
    measured: bool ``[S, M]``: which measurements were taken (skipped segments of a
      growing truncation are not); default all.

  Returns:
    ``(gradients, new_accumulated)``, both shaped like ``eps``; ``new_accumulated`` is cleared
    for runs that reset during the truncation.

  References:
    Vicol et al. 2021, arXiv:2112.13835, Algorithm 2.
  """
  chex.assert_equal_shape([step_differences, resets])
  measured = jnp.ones(resets.shape, bool) if measured is None else measured
  before_reset = jnp.cumsum(resets, axis=1) == 0
  count = jnp.maximum(jnp.sum(measured, axis=1), 1)
  current = antithetic_es_gradient(
      eps, jnp.sum(jnp.where(measured, step_differences, 0.0), axis=1) / count, sigma)
  earlier = antithetic_es_gradient(
      accumulated,
      jnp.sum(jnp.where(before_reset & measured, step_differences, 0.0), axis=1) / count, sigma)
  gradients = jax.tree.map(jnp.add, current, earlier)
  keep = ~jnp.any(resets, axis=1)
  new_accumulated = jax.tree.map(
      lambda a, e: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0) + e,
      accumulated, eps)
  return gradients, new_accumulated


class Antithetic(NamedTuple):
  """One truncation's antithetic particles, as the estimator hands them to its ES side.

  Attributes:
    eps: the perturbations ``[S, ...]``.
    theta_negative: ``theta - eps`` ``[S, ...]``.
    start: the positive runs at the start of the truncation ``[S, ...]``.
    positive: the outputs of the positive half's unroll (already run by the estimator).
  """
  eps: MetaParams
  theta_negative: MetaParams
  start: truncation_lib.InnerState
  positive: truncation_lib.UnrollOutput


class ESSide(Protocol):
  """What an estimator needs of its ES side (see the module docstring)."""

  def init(self, positive: truncation_lib.InnerState, meta_params: MetaParams) -> Any: ...

  def perturbation(self, state: Any, fresh: MetaParams) -> MetaParams: ...

  def samples(self, unroll: Unroll, pair: Antithetic, state: Any, sigma: float,
              truncation: truncation_lib.TruncationConfig
              ) -> tuple[MetaParams, Any, truncation_lib.UnrollOutput]: ...

  def reset(self, state: Any, mask: jax.Array) -> Any: ...


@dataclasses.dataclass(frozen=True)
class AntitheticES:
  """Antithetic ES over one truncation: both halves start from the positive runs.

  Unbiased for the truncation's own smoothed meta-loss, and so biased towards short horizons
  when truncations are shorter than inner training.
  """

  def init(self, positive: truncation_lib.InnerState, meta_params: MetaParams) -> tuple:
    del positive, meta_params
    return ()

  def perturbation(self, state: tuple, fresh: MetaParams) -> MetaParams:
    del state
    return fresh

  def samples(self, unroll: Unroll, pair: Antithetic, state: tuple, sigma: float,
              truncation: truncation_lib.TruncationConfig
              ) -> tuple[MetaParams, tuple, truncation_lib.UnrollOutput]:
    del truncation
    _, negative = unroll(pair.theta_negative, pair.start)
    differences = truncation_lib.masked_mean(pair.positive.meta_losses - negative.meta_losses,
                                             pair.positive.measured, axis=1)
    return antithetic_es_gradient(pair.eps, differences, sigma), state, negative

  def reset(self, state: tuple, mask: jax.Array) -> tuple:
    del mask
    return state


@chex.dataclass
class PersistentESState:
  """The state PES keeps across truncations, each leaf ``[num_particles, ...]``.

  Attributes:
    negative: the runs at ``theta - eps`` (the positive runs are the estimator's).
    accumulated: perturbations accumulated since each run's last reset.
  """
  negative: truncation_lib.InnerState
  accumulated: MetaParams


@dataclasses.dataclass(frozen=True)
class PersistentES:
  """Persistent ES: each half keeps its own runs, and perturbations accumulate until a reset,
  which makes the estimate unbiased for the whole inner run.

  References:
    Vicol et al. 2021, arXiv:2112.13835.
  """

  def init(self, positive: truncation_lib.InnerState,
           meta_params: MetaParams) -> PersistentESState:
    num = jax.tree.leaves(positive)[0].shape[0]
    zeros = jax.tree.map(lambda p: jnp.zeros((num,) + p.shape, p.dtype), meta_params)
    negative = jax.tree.map(jnp.copy, positive)  # its own buffers (donation-safe)
    return PersistentESState(negative=negative, accumulated=zeros)

  def perturbation(self, state: PersistentESState, fresh: MetaParams) -> MetaParams:
    del state
    return fresh

  def samples(self, unroll: Unroll, pair: Antithetic, state: PersistentESState, sigma: float,
              truncation: truncation_lib.TruncationConfig
              ) -> tuple[MetaParams, PersistentESState, truncation_lib.UnrollOutput]:
    negative_runs, negative = unroll(pair.theta_negative, state.negative)
    resets = truncation_lib.resets_before_measurements(truncation, pair.positive.resets)
    gradients, accumulated = pes_gradient(
        pair.eps, state.accumulated, pair.positive.meta_losses - negative.meta_losses, resets,
        sigma, pair.positive.measured)
    return gradients, PersistentESState(negative=negative_runs, accumulated=accumulated), negative

  def reset(self, state: PersistentESState, mask: jax.Array) -> PersistentESState:
    return state.replace(negative=truncation_lib.force_reset(state.negative, mask))


@chex.dataclass
class NoiseReuseESState:
  """The state noise-reuse ES keeps across truncations, each leaf ``[num_particles, ...]``.

  Attributes:
    negative: the runs at ``theta - eps`` (the positive runs are the estimator's).
    eps: the perturbation each particle's runs are using.
    accumulated: an earlier perturbation that still shapes the current runs: the one a run
      started its episode under, when it reset inside a truncation and ``eps`` was redrawn
      at the next one (zeros otherwise).
    redraw: bool ``[num_particles]``: draw a new ``eps`` at the next truncation (at the
      start, and after a truncation in which the run reset).
  """
  negative: truncation_lib.InnerState
  eps: MetaParams
  accumulated: MetaParams
  redraw: jax.Array


@dataclasses.dataclass(frozen=True)
class NoiseReuseES:
  """Noise-reuse ES: each run keeps one perturbation for its whole episode.

  Both halves of a pair keep their runs across truncations, as in PES, but the perturbation
  is drawn once per episode instead of once per truncation, so each truncation's estimate is
  ``eps (L+ - L-) / (2 sigma^2)`` over its own losses, without PES's sum of perturbations
  whose variance grows with the episode. Unbiased for the whole episode's smoothed
  meta-loss. A run that resets inside a truncation starts its new episode under the current
  perturbation; the next truncation draws a new one and credits the losses that follow to
  both (until the next reset), which keeps the estimate unbiased.

  References:
    Li et al. 2023, arXiv:2304.12180 (NRES).
  """

  def init(self, positive: truncation_lib.InnerState,
           meta_params: MetaParams) -> NoiseReuseESState:
    num = jax.tree.leaves(positive)[0].shape[0]
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros((num,) + p.shape, p.dtype), meta_params)
    return NoiseReuseESState(negative=jax.tree.map(jnp.copy, positive), eps=zeros(),
                             accumulated=zeros(), redraw=jnp.ones((num,), bool))

  def perturbation(self, state: NoiseReuseESState, fresh: MetaParams) -> MetaParams:
    return _where_particles(state.redraw, fresh, state.eps)

  def samples(self, unroll: Unroll, pair: Antithetic, state: NoiseReuseESState, sigma: float,
              truncation: truncation_lib.TruncationConfig
              ) -> tuple[MetaParams, NoiseReuseESState, truncation_lib.UnrollOutput]:
    negative_runs, negative = unroll(pair.theta_negative, state.negative)
    resets = truncation_lib.resets_before_measurements(truncation, pair.positive.resets)
    # PES's attribution with at most two perturbations: this episode's own, and an earlier
    # one only for the measurements before a reset.
    gradients, _ = pes_gradient(pair.eps, state.accumulated,
                                pair.positive.meta_losses - negative.meta_losses, resets,
                                sigma, pair.positive.measured)
    reset = jnp.any(pair.positive.resets, axis=1)
    return gradients, NoiseReuseESState(
        negative=negative_runs, eps=pair.eps,
        accumulated=_where_particles(reset, pair.eps, state.accumulated),
        redraw=reset), negative

  def reset(self, state: NoiseReuseESState, mask: jax.Array) -> NoiseReuseESState:
    # A forced reset starts the next truncation's episode; a new perturbation shapes all of it.
    return state.replace(negative=truncation_lib.force_reset(state.negative, mask),
                         redraw=state.redraw | mask)


def _where_particles(mask: jax.Array, x: MetaParams, y: MetaParams) -> MetaParams:
  """``x`` for the particles where ``mask`` ``[S]`` holds, else ``y``."""
  return jax.tree.map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                      x, y)
