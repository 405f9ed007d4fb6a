"""Estimators: a pathwise side, an ES side and a combiner, named in one registry.

An estimator is an :class:`EstimatorSpec`: whether it backpropagates through the positive
half of each antithetic pair (the pathwise side), which ES side it uses (a key of
:data:`ES_SIDES`), and how the two are combined. :class:`Estimator` runs any spec; adding an
estimator is one ES side class (or combiner) and one entry of :data:`ESTIMATORS`.

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein 2019. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML. arXiv:1810.10180.
  Vicol, Metz, Sohl-Dickstein 2021. "Unbiased gradient estimation in unrolled computation
  graphs with persistent evolution strategies". ICML. arXiv:2112.13835.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from metatrain import truncation as truncation_lib
from metatrain.estimators import combine, es, particles
from metatrain.estimators.pathwise import pathwise_gradient
from metatrain.tasks import base

MetaParams = Any

__all__ = ("ES_SIDES", "ESTIMATORS", "MERGED_ES", "Estimator", "EstimatorConfig",
           "EstimatorSpec", "EstimatorState")

Combiner = Callable[[MetaParams | None, MetaParams | None],
                    tuple[MetaParams, dict[str, jax.Array]]]


class EstimatorSpec(NamedTuple):
  """What an estimator is made of.

  Attributes:
    pathwise: backpropagate through the positive half (per-sample pathwise gradients).
    es_side: a key of :data:`ES_SIDES`, :data:`MERGED_ES` (the config's ``merged_es``) or
      ``None`` for no ES side.
    combiner: joins ``(pathwise samples or None, ES samples or None)`` into the gradient.
  """
  pathwise: bool
  es_side: str | None
  combiner: Combiner


MERGED_ES = "merged_es"

ES_SIDES: dict[str, es.ESSide] = {
    "es": es.AntitheticES(),
    "pes": es.PersistentES(),
    "nres": es.NoiseReuseES(),
}

ESTIMATORS: dict[str, EstimatorSpec] = {
    "pathwise": EstimatorSpec(pathwise=True, es_side=None, combiner=combine.mean),
    "es": EstimatorSpec(pathwise=False, es_side="es", combiner=combine.mean),
    "pes": EstimatorSpec(pathwise=False, es_side="pes", combiner=combine.mean),
    "nres": EstimatorSpec(pathwise=False, es_side="nres", combiner=combine.mean),
    "merged": EstimatorSpec(pathwise=True, es_side=MERGED_ES,
                            combiner=combine.inverse_variance),
}


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
  """How meta-gradients are estimated (``estimator.*`` of a run config).

  Attributes:
    name: a key of :data:`ESTIMATORS`: ``"pathwise"``, ``"es"``, ``"pes"``, ``"nres"``
      (noise-reuse ES) or ``"merged"``.
    merged_es: the ES side of ``"merged"``: a key of :data:`ES_SIDES` (``"es"``, ``"pes"``
      or ``"nres"``).
    num_tasks: independent task instances (own initialisation, data stream and horizons).
    num_pairs: antithetic pairs per task instance.
    sigma: standard deviation of the Gaussian smoothing of the optimizer weights.
    particle_chunk: particles vectorised together; chunks run one after another
      (:func:`~metatrain.estimators.map_particles`). 0: all particles in one ``vmap``. -1
      (the default) picks by backend: one particle per device at a time on CPU, where that
      measured faster for ConvNets, and all at once on GPU and TPU. With several devices, a
      multiple of their count. Changes speed and memory, not the estimate (up to
      floating-point rounding).
  """
  name: str = "pes"
  merged_es: str = "pes"
  num_tasks: int = 8
  num_pairs: int = 8
  sigma: float = 0.01
  particle_chunk: int = -1

  def __post_init__(self):
    if self.name not in ESTIMATORS:
      raise ValueError(f"estimator.name must be one of {tuple(ESTIMATORS)}, got {self.name!r}")
    if self.merged_es not in ES_SIDES:
      raise ValueError(f"estimator.merged_es must be one of {tuple(ES_SIDES)}, got "
                       f"{self.merged_es!r}")
    if self.num_tasks < 1 or self.num_pairs < 1:
      raise ValueError("estimator.num_tasks and estimator.num_pairs must be >= 1")
    if not self.sigma > 0:
      raise ValueError(f"estimator.sigma must be positive, got {self.sigma}")
    if self.particle_chunk < -1 or (self.particle_chunk > 0
                                    and self.num_particles % self.particle_chunk):
      raise ValueError(f"estimator.particle_chunk must be -1 (automatic), 0 or divide "
                       f"num_tasks * num_pairs = {self.num_particles}, got "
                       f"{self.particle_chunk}")

  @property
  def num_particles(self) -> int:
    """Antithetic pairs in all: ``num_tasks * num_pairs``."""
    return self.num_tasks * self.num_pairs

  @property
  def spec(self) -> EstimatorSpec:
    """The estimator's parts (:data:`ESTIMATORS`)."""
    return ESTIMATORS[self.name]

  @property
  def es_side(self) -> es.ESSide | None:
    """The ES side, or ``None`` for an estimator without one."""
    side = self.spec.es_side
    return None if side is None else ES_SIDES[self.merged_es if side == MERGED_ES else side]

  def resolved_particle_chunk(self) -> int:
    """``particle_chunk``, with -1 resolved for this process's backend and devices.

    It reads the backend, so call it after ``jax.distributed.initialize`` (if at all).
    """
    if self.particle_chunk != -1:
      return self.particle_chunk
    return jax.device_count() if jax.default_backend() == "cpu" else 0


@chex.dataclass
class EstimatorState:
  """An estimator's inner runs in progress, each leaf with a leading ``[num_particles]`` axis.

  Attributes:
    positive: the runs at ``theta + eps`` (for a stateless ES side, both halves of a pair
      start each truncation from them).
    es: the ES side's own state (``()`` for antithetic ES and for estimators without an ES
      side; :class:`~metatrain.estimators.PersistentESState` for PES,
      :class:`~metatrain.estimators.NoiseReuseESState` for NRES).
  """
  positive: truncation_lib.InnerState
  es: Any = ()


@dataclasses.dataclass(frozen=True)
class Estimator:
  """A meta-gradient estimator for one task and learned optimizer.

  ``init(meta_params, key, data)`` builds its state (the inner runs in progress) and
  ``estimate(meta_params, state, key, data)`` returns ``(gradient, new_state, diagnostics)``;
  both are pure and jittable.

  Example:
    >>> est = Estimator(task, lopt, EstimatorConfig(name="pes"), TruncationConfig())
    >>> state = est.init(meta_params, key, data)
    >>> grad, state, diagnostics = jax.jit(est.estimate)(meta_params, state, key, data)
  """
  task: base.Task
  lopt: truncation_lib.LearnedOptimizerLike
  config: EstimatorConfig
  truncation: truncation_lib.TruncationConfig

  def init(self, meta_params: MetaParams, key: chex.PRNGKey, data: base.Data) -> EstimatorState:
    """Starts ``num_particles`` inner runs; the pairs of one task instance share a run key."""
    del data
    cfg = self.config
    task_keys = jax.random.split(key, cfg.num_tasks)
    run_keys = jnp.repeat(task_keys, cfg.num_pairs, axis=0)
    start = lambda k: truncation_lib.init_inner_state(self.task, self.lopt, meta_params,
                                                      self.truncation, k)
    positive = jax.vmap(start)(run_keys)
    side = cfg.es_side
    return EstimatorState(positive=positive,
                          es=() if side is None else side.init(positive, meta_params))

  def estimate(self, meta_params: MetaParams, state: EstimatorState, key: chex.PRNGKey,
               data: base.Data, num_segments: jax.Array | int = 1
               ) -> tuple[MetaParams, EstimatorState, dict[str, jax.Array]]:
    """Estimates the meta-gradient over one truncation and advances the inner runs.

    Args:
      meta_params: the current optimizer weights ``theta``.
      state: from :meth:`init` or the previous call.
      key: fresh randomness for this truncation's perturbations.
      data: the task's arrays.
      num_segments: the truncation's segments of ``truncation.length`` steps, in ``[1,
        truncation.max_segments]`` (see :func:`~metatrain.truncation.scheduled_segments`);
        one compiled function serves every value.

    Returns:
      ``(gradient, new_state, diagnostics)``: the gradient is shaped like ``meta_params``;
      diagnostics are float32 scalars (meta-loss, norms, per-sample variances, ES weight,
      resets and divergences).
    """
    cfg, spec, side = self.config, self.config.spec, self.config.es_side
    chunk = cfg.resolved_particle_chunk()

    def unroll(theta, runs):
      step = lambda args: truncation_lib.unroll_segments(self.task, self.lopt, self.truncation,
                                                         *args, data, num_segments)
      return particles.map_particles(step, (theta, runs), chunk)

    eps = particles.sample_perturbations(meta_params, key, cfg.num_particles, cfg.sigma)
    if side is not None:
      eps = side.perturbation(state.es, eps)
    theta_pos = jax.tree.map(jnp.add, meta_params, eps)
    diagnostics, outputs = {}, []
    pathwise_samples = es_samples = None
    if spec.pathwise:
      pathwise_samples, new_pos, out_pos = pathwise_gradient(
          self.task, self.lopt, self.truncation, theta_pos, state.positive, data,
          particle_chunk=chunk, num_segments=num_segments)
      diagnostics["pathwise_variance"] = particles.mean_variance(pathwise_samples)
      diagnostics["pathwise_norm"] = particles.global_norm(
          particles.mean_over_samples(pathwise_samples))
    else:
      new_pos, out_pos = unroll(theta_pos, state.positive)
    outputs.append(out_pos)
    es_state = state.es
    if side is not None:
      pair = es.Antithetic(eps=eps, theta_negative=jax.tree.map(jnp.subtract, meta_params, eps),
                           start=state.positive, positive=out_pos)
      es_samples, es_state, out_neg = side.samples(unroll, pair, state.es, cfg.sigma,
                                                   self.truncation)
      outputs.append(out_neg)
      diagnostics["es_variance"] = particles.mean_variance(es_samples)
      diagnostics["es_norm"] = particles.global_norm(particles.mean_over_samples(es_samples))
    gradient, combined = spec.combiner(pathwise_samples, es_samples)
    diagnostics.update(combined)

    run_diverged = jax.vmap(truncation_lib.diverged, in_axes=(None, 0))
    diverged = jnp.any(jnp.stack([run_diverged(self.truncation, out) for out in outputs]),
                       axis=0)
    if side is not None:
      es_state = side.reset(es_state, diverged)
    new_state = EstimatorState(positive=truncation_lib.force_reset(new_pos, diverged),
                               es=es_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(gradient, meta_params)
    stepped = jnp.repeat(out_pos.measured, self.truncation.meta_loss_every, axis=-1)
    diagnostics.update(
        meta_loss=jnp.mean(jnp.stack([truncation_lib.masked_mean(out.meta_losses, out.measured)
                                      for out in outputs])),
        train_loss=truncation_lib.masked_mean(out_pos.train_losses, stepped),
        truncation_length=(self.truncation.length * jnp.asarray(num_segments)).astype(
            jnp.float32),
        grad_norm=particles.global_norm(gradient),
        resets=jnp.sum(out_pos.resets).astype(jnp.float32),
        divergences=jnp.sum(diverged).astype(jnp.float32))
    return gradient, new_state, diagnostics
