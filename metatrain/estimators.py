"""Meta-gradient estimators: pathwise, antithetic ES, persistent ES and their merge.

All four estimate the gradient of the variational (Gaussian-smoothed) meta-objective
``E_eps[L(theta + eps)]``, ``eps ~ N(0, sigma^2 I)``, where ``L`` is the mean meta-loss over a
truncation of inner training. Samples are antithetic pairs ``theta +- eps``; the
``num_tasks * num_pairs`` particles are vectorised with ``vmap``, and the pairs of one task
instance share its data, initialisation and horizons (common random numbers).

* :func:`pathwise_gradient` backpropagates through the truncated unroll at ``theta + eps``.
* :func:`antithetic_es_gradient` is ``eps (L+ - L-) / (2 sigma^2)`` over one truncation.
* :func:`pes_gradient` adds the perturbations accumulated since the run's last reset, which
  makes the estimate unbiased for the whole inner run (Vicol et al. 2021).
* :func:`merge_by_inverse_variance` combines a pathwise and an ES-type estimate per element,
  weighting each by the inverse of its variance across the batch of samples (Metz et al.).

Each estimator is used through :class:`Estimator`: ``init(meta_params, key, data)`` builds its
state (the inner runs in progress) and ``estimate(meta_params, state, key, data)`` returns
``(gradient, new_state, diagnostics)``; both are pure and jittable.

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein 2019. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML. arXiv:1810.10180.
  Vicol, Metz, Sohl-Dickstein 2021. "Unbiased gradient estimation in unrolled computation
  graphs with persistent evolution strategies". ICML. arXiv:2112.13835.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from metatrain import truncation as truncation_lib
from metatrain.tasks import base

MetaParams = Any
ESTIMATORS = ("pathwise", "es", "pes", "merged")

__all__ = ("ESTIMATORS", "Estimator", "EstimatorConfig", "EstimatorState",
           "antithetic_es_gradient", "map_particles", "merge_by_inverse_variance",
           "pathwise_gradient", "pes_gradient")


# -- per-sample gradient formulas -------------------------------------------------------


def pathwise_gradient(task: base.Task, lopt: truncation_lib.LearnedOptimizerLike,
                      config: truncation_lib.TruncationConfig, theta: MetaParams,
                      states: truncation_lib.InnerState, data: base.Data, *,
                      particle_chunk: int = 0
                      ) -> tuple[MetaParams, truncation_lib.InnerState,
                                 truncation_lib.UnrollOutput]:
  """Per-sample pathwise (reparameterisation) gradients through one truncation.

  For each sample ``i`` this backpropagates the truncation's mean meta-loss through the unroll
  at ``theta_i`` (e.g. ``theta + eps_i``): inner training, the learned optimizer and its
  features, second-order terms included.

  Args:
    task: the inner problem.
    lopt: the learned optimizer.
    config: truncation settings.
    theta: per-sample weights ``[S, ...]``.
    states: per-sample inner runs ``[S, ...]``.
    data: the task's arrays (shared by all samples).
    particle_chunk: samples vectorised together (see :func:`map_particles`); 0: all.

  Returns:
    ``(gradients [S, ...], new_states, outputs)``.

  References:
    Metz et al. 2019, arXiv:1810.10180, Section 3.
  """
  def mean_loss(theta_i, state_i):
    new_state, out = truncation_lib.unroll(task, lopt, config, theta_i, state_i, data)
    return jnp.mean(out.meta_losses), (new_state, out)

  gradients, (new_states, outputs) = map_particles(
      lambda args: jax.grad(mean_loss, has_aux=True)(*args), (theta, states), particle_chunk)
  return gradients, new_states, outputs


def map_particles(fn: Callable[[Any], Any], xs: Any, chunk: int = 0) -> Any:
  """``jax.vmap(fn)(xs)`` over the leading particle axis, ``chunk`` particles at a time.

  Chunks run one after another in ``lax.scan``, each vectorised with ``vmap``; a chunk of
  one particle is not vmapped at all (``lax.map``), which on XLA:CPU ran the ConvNet unrolls
  about 20% faster than a size-1 ``vmap``. On CPU this is often faster than one wide ``vmap``
  (per-particle weights make batched matmuls slow) and it bounds memory to one chunk's.
  Chunk ``r`` holds particles ``r, r + S/chunk, r + 2 S/chunk, ...``: one from each contiguous
  block of ``S/chunk`` particles, so when the particle axis is sharded over devices in
  contiguous blocks (``chunk`` a multiple of the device count), every device works on its own
  particles.

  Args:
    fn: maps one particle's pytree to a pytree.
    xs: pytrees with a leading particle axis ``[S, ...]``.
    chunk: particles vectorised together, a divisor of ``S``; 0 (or ``S``): one ``vmap``.

  Returns:
    ``fn``'s outputs stacked along a leading particle axis, in the order of ``xs``.

  Raises:
    ValueError: ``chunk`` does not divide the number of particles.
  """
  num = jax.tree.leaves(xs)[0].shape[0]
  if chunk in (0, num):
    return jax.vmap(fn)(xs)
  if chunk < 0 or num % chunk:
    raise ValueError(f"particle_chunk must divide the {num} particles, got {chunk}")
  if chunk == 1:  # no size-1 vmap: XLA:CPU runs the unbatched ops faster
    return jax.lax.map(fn, xs)
  rows = num // chunk
  # [S] -> [chunk, rows] keeps contiguous blocks together; scan over rows, vmap over chunk.
  split = lambda x: jnp.swapaxes(x.reshape((chunk, rows) + x.shape[1:]), 0, 1)
  merge = lambda y: jnp.swapaxes(y, 0, 1).reshape((num,) + y.shape[2:])
  _, ys = jax.lax.scan(lambda carry, x: (carry, jax.vmap(fn)(x)), None,
                       jax.tree.map(split, xs))
  return jax.tree.map(merge, ys)


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
                 resets: jax.Array, sigma: float) -> tuple[MetaParams, MetaParams]:
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

  Returns:
    ``(gradients, new_accumulated)``, both shaped like ``eps``; ``new_accumulated`` is cleared
    for runs that reset during the truncation.

  References:
    Vicol et al. 2021, arXiv:2112.13835, Algorithm 2.
  """
  chex.assert_equal_shape([step_differences, resets])
  before_reset = jnp.cumsum(resets, axis=1) == 0
  current = antithetic_es_gradient(eps, jnp.mean(step_differences, axis=1), sigma)
  earlier = antithetic_es_gradient(
      accumulated, jnp.mean(jnp.where(before_reset, step_differences, 0.0), axis=1), sigma)
  gradients = jax.tree.map(jnp.add, current, earlier)
  keep = ~jnp.any(resets, axis=1)
  new_accumulated = jax.tree.map(
      lambda a, e: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0) + e,
      accumulated, eps)
  return gradients, new_accumulated


def merge_by_inverse_variance(pathwise_samples: MetaParams, es_samples: MetaParams,
                              epsilon: float = 1e-20) -> tuple[MetaParams, MetaParams]:
  """Merges two batches of gradient samples per element by inverse variance.

  With per-element sample variances ``v_rp`` and ``v_es`` across the leading sample axis, the
  merged gradient is ``w * mean(rp) + (1 - w) * mean(es)`` with ``w = v_es / (v_rp + v_es)``,
  which minimises the variance of the combination of two independent estimates.

  Args:
    pathwise_samples: per-sample pathwise gradients ``[S, ...]``.
    es_samples: per-sample ES or PES gradients ``[S, ...]``.
    epsilon: guards against 0/0 when both variances vanish (then the weights are equal).

  Returns:
    ``(merged, es_weight)``: the merged gradient (no sample axis) and, per element, the weight
    ``1 - w`` given to the ES side.

  References:
    Metz et al. 2019, arXiv:1810.10180, Section 4.2.
  """
  def merge(rp, es):
    v_rp, v_es = jnp.var(rp, axis=0), jnp.var(es, axis=0)
    w = (v_es + epsilon) / (v_rp + v_es + 2 * epsilon)
    return w * jnp.mean(rp, axis=0) + (1 - w) * jnp.mean(es, axis=0), 1 - w

  merged = jax.tree.map(merge, pathwise_samples, es_samples)
  is_pair = lambda x: isinstance(x, tuple)
  return (jax.tree.map(lambda m: m[0], merged, is_leaf=is_pair),
          jax.tree.map(lambda m: m[1], merged, is_leaf=is_pair))


def _mean_over_samples(samples: MetaParams) -> MetaParams:
  return jax.tree.map(lambda s: jnp.mean(s, axis=0), samples)


def _mean_variance(samples: MetaParams) -> jax.Array:
  """Per-element variance across samples, averaged over all elements."""
  leaves = jax.tree.leaves(jax.tree.map(lambda s: jnp.var(s, axis=0), samples))
  return sum(jnp.sum(v) for v in leaves) / sum(v.size for v in leaves)


def _global_norm(tree: MetaParams) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


# -- the estimators ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
  """Settings shared by all estimators.

  Attributes:
    estimator: one of ``"pathwise"``, ``"es"``, ``"pes"``, ``"merged"``.
    merged_es: the ES side of ``"merged"``: ``"es"`` or ``"pes"``.
    num_tasks: independent task instances (own initialisation, data stream and horizons).
    num_pairs: antithetic pairs per task instance.
    sigma: standard deviation of the Gaussian smoothing of the optimizer weights.
    truncation: how inner training is unrolled and scored.
    particle_chunk: particles vectorised together; chunks run one after another
      (:func:`map_particles`). 0: all particles in one ``vmap``. Changes speed and memory, not
      the estimate (up to floating-point rounding).
  """
  estimator: str = "pes"
  merged_es: str = "pes"
  num_tasks: int = 8
  num_pairs: int = 8
  sigma: float = 0.01
  truncation: truncation_lib.TruncationConfig = truncation_lib.TruncationConfig()
  particle_chunk: int = 0

  def __post_init__(self):
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
    if self.merged_es not in ("es", "pes"):
      raise ValueError(f"merged_es must be 'es' or 'pes', got {self.merged_es!r}")
    if self.num_tasks < 1 or self.num_pairs < 1:
      raise ValueError("num_tasks and num_pairs must be >= 1")
    if not self.sigma > 0:
      raise ValueError(f"sigma must be positive, got {self.sigma}")
    if self.particle_chunk < 0 or (self.particle_chunk
                                   and self.num_particles % self.particle_chunk):
      raise ValueError(f"particle_chunk must be 0 or divide num_tasks * num_pairs = "
                       f"{self.num_particles}, got {self.particle_chunk}")

  @property
  def num_particles(self) -> int:
    """Antithetic pairs in all: ``num_tasks * num_pairs``."""
    return self.num_tasks * self.num_pairs

  @property
  def persistent(self) -> bool:
    """Whether perturbations accumulate across truncations (PES, or merged over PES)."""
    return self.estimator == "pes" or (self.estimator == "merged" and self.merged_es == "pes")


@chex.dataclass
class EstimatorState:
  """Inner runs in progress, each with a leading particle axis ``[num_particles]``.

  Attributes:
    positive: runs at ``theta + eps`` (for ES and pathwise, the only runs: both halves of a
      pair start each truncation from them).
    negative: runs at ``theta - eps``, kept only by persistent estimators (else ``None``).
    accumulated: perturbations accumulated since each run's last reset (persistent only).
  """
  positive: truncation_lib.InnerState
  negative: truncation_lib.InnerState | None = None
  accumulated: MetaParams | None = None


@dataclasses.dataclass(frozen=True)
class Estimator:
  """A meta-gradient estimator for one task and learned optimizer.

  Example:
    >>> est = Estimator(task, lopt, EstimatorConfig(estimator="pes"))
    >>> state = est.init(meta_params, key, data)
    >>> grad, state, diagnostics = jax.jit(est.estimate)(meta_params, state, key, data)
  """
  task: base.Task
  lopt: truncation_lib.LearnedOptimizerLike
  config: EstimatorConfig

  def init(self, meta_params: MetaParams, key: chex.PRNGKey, data: base.Data) -> EstimatorState:
    """Starts ``num_particles`` inner runs; the pairs of one task instance share a run key."""
    del data
    cfg = self.config
    task_keys = jax.random.split(key, cfg.num_tasks)
    run_keys = jnp.repeat(task_keys, cfg.num_pairs, axis=0)
    start = lambda k: truncation_lib.init_inner_state(self.task, self.lopt, meta_params,
                                                  cfg.truncation, k)
    positive = jax.vmap(start)(run_keys)
    if not cfg.persistent:
      return EstimatorState(positive=positive)
    zeros = jax.tree.map(lambda p: jnp.zeros((cfg.num_particles,) + p.shape, p.dtype),
                         meta_params)
    negative = jax.tree.map(jnp.copy, positive)  # its own buffers (donation-safe)
    return EstimatorState(positive=positive, negative=negative, accumulated=zeros)

  def _unroll(self, theta, state, data):
    unroll = lambda args: truncation_lib.unroll(self.task, self.lopt, self.config.truncation,
                                                *args, data)
    return map_particles(unroll, (theta, state), self.config.particle_chunk)

  def estimate(self, meta_params: MetaParams, state: EstimatorState, key: chex.PRNGKey,
               data: base.Data) -> tuple[MetaParams, EstimatorState, dict[str, jax.Array]]:
    """Estimates the meta-gradient over one truncation and advances the inner runs.

    Args:
      meta_params: the current optimizer weights ``theta``.
      state: from :meth:`init` or the previous call.
      key: fresh randomness for this truncation's perturbations.
      data: the task's arrays.

    Returns:
      ``(gradient, new_state, diagnostics)``: the gradient is shaped like ``meta_params``;
      diagnostics are float32 scalars (meta-loss, norms, per-sample variances, ES weight,
      resets and divergences).
    """
    cfg = self.config
    eps = _sample_perturbations(meta_params, key, cfg.num_particles, cfg.sigma)
    theta_pos = jax.tree.map(lambda t, e: t + e, meta_params, eps)
    theta_neg = jax.tree.map(lambda t, e: t - e, meta_params, eps)
    want_pathwise = cfg.estimator in ("pathwise", "merged")
    want_es = cfg.estimator != "pathwise"

    if want_pathwise:
      rp_samples, new_pos, out_pos = pathwise_gradient(
          self.task, self.lopt, cfg.truncation, theta_pos, state.positive, data,
          particle_chunk=cfg.particle_chunk)
    else:
      new_pos, out_pos = self._unroll(theta_pos, state.positive, data)
    diagnostics = {}
    if want_es:
      negative = state.negative if cfg.persistent else state.positive
      new_neg, out_neg = self._unroll(theta_neg, negative, data)
      differences = out_pos.meta_losses - out_neg.meta_losses
      if cfg.persistent:
        resets = truncation_lib.resets_before_measurements(cfg.truncation, out_pos.resets)
        es_samples, accumulated = pes_gradient(eps, state.accumulated, differences, resets,
                                               cfg.sigma)
      else:
        es_samples = antithetic_es_gradient(eps, jnp.mean(differences, axis=1), cfg.sigma)
      diagnostics["es_variance"] = _mean_variance(es_samples)
      diagnostics["es_norm"] = _global_norm(_mean_over_samples(es_samples))
      diverged = jax.vmap(truncation_lib.diverged, in_axes=(None, 0))(cfg.truncation, out_pos) | (
          jax.vmap(truncation_lib.diverged, in_axes=(None, 0))(cfg.truncation, out_neg))
      meta_loss = 0.5 * (jnp.mean(out_pos.meta_losses) + jnp.mean(out_neg.meta_losses))
    else:
      diverged = jax.vmap(truncation_lib.diverged, in_axes=(None, 0))(cfg.truncation, out_pos)
      meta_loss = jnp.mean(out_pos.meta_losses)
    if want_pathwise:
      diagnostics["pathwise_variance"] = _mean_variance(rp_samples)
      diagnostics["pathwise_norm"] = _global_norm(_mean_over_samples(rp_samples))

    if cfg.estimator == "pathwise":
      gradient = _mean_over_samples(rp_samples)
    elif cfg.estimator == "merged":
      gradient, es_weight = merge_by_inverse_variance(rp_samples, es_samples)
      leaves = jax.tree.leaves(es_weight)
      diagnostics["es_weight"] = sum(jnp.sum(w) for w in leaves) / sum(w.size for w in leaves)
    else:
      gradient = _mean_over_samples(es_samples)

    new_pos = truncation_lib.force_reset(new_pos, diverged)
    if cfg.persistent:
      new_state = EstimatorState(positive=new_pos,
                                 negative=truncation_lib.force_reset(new_neg, diverged),
                                 accumulated=accumulated)
    else:
      new_state = EstimatorState(positive=new_pos)
    chex.assert_trees_all_equal_shapes_and_dtypes(gradient, meta_params)
    diagnostics.update(
        meta_loss=meta_loss, train_loss=jnp.mean(out_pos.train_losses),
        grad_norm=_global_norm(gradient),
        resets=jnp.sum(out_pos.resets).astype(jnp.float32),
        divergences=jnp.sum(diverged).astype(jnp.float32))
    return gradient, new_state, diagnostics


def _sample_perturbations(meta_params: MetaParams, key: chex.PRNGKey, num: int,
                          sigma: float) -> MetaParams:
  """Gaussian perturbations ``[num, ...]`` of scale ``sigma`` for every leaf."""
  leaves, treedef = jax.tree.flatten(meta_params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      sigma * jax.random.normal(k, (num,) + jnp.shape(leaf), jnp.result_type(leaf))
      for k, leaf in zip(keys, leaves, strict=True)])
