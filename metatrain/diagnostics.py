"""The pathologies of unrolled meta-gradients (Metz et al. 2019), measured for any run config.

:func:`diagnose` measures, for several unroll lengths ``L`` of fresh inner runs:

(a) the meta-loss along a 1-D slice ``theta + alpha * d`` of the optimizer weights (``d`` a
    random unit direction, ``alpha`` on a grid): its surface gets rougher as ``L`` grows;
(b) the norm of the pathwise (backpropagated) meta-gradient, which grows, up to exploding;
(c) the per-sample variance of each estimator (pathwise, ES, PES and their inverse-variance
    merge), which for the pathwise estimator grows with ``L`` like its norm.

Every length is computed from ONE unroll of ``max(lengths)`` steps: a fresh run whose
horizon is ``max(lengths)`` takes exactly the steps of a fresh run of horizon ``L`` during
its first ``L`` steps, so the truncation meta-loss of length ``L`` is the mean of the first
``L`` per-step meta-losses, and its pathwise gradient is the gradient of that prefix mean
(one reverse pass per length through the shared forward pass). This gives the estimators of
:mod:`metatrain.estimators` for each length with one compilation instead of one per length
and estimator (each costs seconds of XLA compilation on CPU). The unroll is a sequence of
:func:`metatrain.truncation.unroll` calls of the run's truncation length, each
rematerialised in the backward pass, so memory grows with the number of truncations rather
than of steps. The particles are those of :meth:`metatrain.estimators.Estimator.init`
(``num_tasks`` instances of ``num_pairs`` antithetic pairs) and the per-sample gradients are
the estimators' own formulas (:mod:`metatrain.estimators`: the same perturbations, ES
formulas, merge and sample statistics; the diagnosis only replaces the unroll by one long
shared unroll). From fresh runs there are no accumulated perturbations yet, so
PES and noise-reuse ES (one perturbation for the whole unroll) coincide with antithetic ES
here.

Example::

  from metatrain import configs, diagnostics
  report = diagnostics.diagnose(configs.get_config("quadratic"), "/tmp/diag")

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein 2019. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML. arXiv:1810.10180.
  Vicol, Metz, Sohl-Dickstein 2021. "Unbiased gradient estimation in unrolled computation
  graphs with persistent evolution strategies". ICML. arXiv:2112.13835.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any

import chex
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import optax_learned
from metatrain import estimators, truncation
from metatrain._json_io import atomic_write, float_array, jsonable
from metatrain.configs import RunConfig
from metatrain.estimators import particles
from metatrain.tasks import base, build_tasks

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MetaParams = Any
JSON_FILE = "diagnostics.json"
PLOT_FILES = {"slice": "slice.png", "norm": "pathwise_norm.png", "variance": "variance.png"}
DEFAULT_LENGTH_MULTIPLES = (1, 2, 4, 8)


def default_lengths(config: RunConfig) -> tuple[int, ...]:
  """Unroll lengths ``(1, 2, 4, 8) * config.truncation.length``."""
  return tuple(m * config.truncation.length for m in DEFAULT_LENGTH_MULTIPLES)


def diagnose(config: RunConfig, out_dir: str | os.PathLike, *, data_dir: str | None = None,
             meta_params: MetaParams | None = None, lengths: tuple[int, ...] | None = None,
             slice_points: int = 41, slice_radius: float | None = None,
             num_samples: int = 64, seed: int = 0, task: base.Task | None = None,
             lopt: truncation.LearnedOptimizerLike | None = None) -> dict[str, Any]:
  """Measures the meta-loss surface, gradient norm and estimator variances against length.

  Args:
    config: the run whose task, learned optimizer and estimator settings (``sigma``,
      ``num_tasks``, ``num_pairs``, meta-loss split, log loss, clip) are diagnosed.
    out_dir: where ``diagnostics.json`` and the PNG plots are written (created if needed).
    data_dir: dataset directory for tasks that read one (see
      :func:`metatrain.tasks.build_tasks`).
    meta_params: the optimizer weights to diagnose; default ``lopt.init(PRNGKey(seed))``.
    lengths: unroll lengths (inner steps from a fresh run); default
      :func:`default_lengths`. Cost grows with ``max(lengths)`` times ``len(lengths)``.
    slice_points: grid points of the 1-D slice (odd counts include ``alpha = 0``).
    slice_radius: the slice spans ``alpha`` in ``[-radius, radius]``; default ten times the
      global norm of ``meta_params`` (the untrained optimizer takes tiny steps, so much
      smaller slices are flat).
    num_samples: at least this many gradient samples (particles) per length: the estimate
      is repeated ``ceil(num_samples / num_particles)`` times with fresh runs and
      perturbations, sequentially (memory stays that of one estimate); statistics are
      averaged over the repeats.
    seed: seeds the weights (by default), the slice direction, the runs and perturbations.
    task: use this task instead of the config's first one.
    lopt: use this learned optimizer instead of ``LearnedOptimizer(**config.optimizer)``.

  Returns:
    The dict written to ``diagnostics.json``. Lists run over ``lengths`` (sorted) unless
    said otherwise; non-finite values are written as ``null`` (``None``):

    * ``lengths``, ``task``, ``seed``, ``num_particles``, ``repeats``, ``config``;
    * ``slice``: ``alphas`` ``[slice_points]``, ``radius``, ``meta_loss``
      ``[len(lengths), slice_points]`` (mean over ``num_tasks`` runs, shared across alphas),
      ``roughness`` (RMS second difference of each curve along the grid);
    * ``meta_loss``: the truncation meta-loss at ``meta_params`` (mean over particles);
    * ``pathwise_norm``: norm of the pathwise estimate (mean of the per-sample gradients),
      as :class:`~metatrain.estimators.Estimator` reports it;
    * ``pathwise_sample_norm``: RMS over samples of the per-sample pathwise gradient norm;
    * ``norm`` and ``variance``: per estimator (``pathwise``, ``es``, ``pes``, ``nres``,
      ``merged``),
      the norm of its estimate and its per-sample variance (per-element variance across
      samples, averaged over elements, as ``Estimator`` diagnostics define it; for
      ``merged`` the samples are ``w * pathwise + (1 - w) * es`` with the merge weights);
    * ``es_weight``: the mean weight the merge gives its ES side (``estimator.merged_es``);
    * ``files``: the file names written into ``out_dir``.

  Raises:
    ValueError: empty or non-positive ``lengths``, ``slice_points < 3`` or a non-positive
      ``num_samples`` or ``slice_radius``.

  References:
    Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
    optimizers", arXiv:1810.10180: rough meta-loss surfaces and exploding pathwise
    gradients for long unrolls, and the inverse-variance merge of pathwise and ES gradients.
  """
  lengths = default_lengths(config) if lengths is None else lengths
  lengths = tuple(sorted({int(length) for length in lengths}))
  if not lengths or lengths[0] < 1:
    raise ValueError(f"lengths must be positive integers, got {lengths}")
  if slice_points < 3:
    raise ValueError(f"slice_points must be >= 3, got {slice_points}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")

  if task is None:
    task = build_tasks(config.task, family=config.task_family, num_variants=1,
                       overrides=config.task_overrides, seed=config.seed, data_dir=data_dir)[0]
  lopt = optax_learned.LearnedOptimizer(**config.optimizer) if lopt is None else lopt
  key = jax.random.PRNGKey(seed)
  meta_params = lopt.init(key) if meta_params is None else meta_params
  if slice_radius is None:
    slice_radius = 10.0 * float(particles.global_norm(meta_params))
  if not slice_radius > 0:
    raise ValueError(f"slice_radius must be positive, got {slice_radius}")

  est_config, trunc_config, num_segments = _estimator_config(config, lengths)
  repeats = math.ceil(num_samples / est_config.num_particles)
  direction_key, slice_key, estimate_key = jax.random.split(jax.random.fold_in(key, 1), 3)
  data = task.load_data()
  alphas = jnp.linspace(-slice_radius, slice_radius, slice_points)

  static = (task, lopt, est_config, trunc_config, num_segments, lengths)
  slice_losses = jax.jit(_slice_losses, static_argnums=range(6))(
      *static, meta_params, _unit_direction(meta_params, direction_key), alphas, slice_key,
      data)
  stats = jax.jit(_length_statistics, static_argnums=range(6))(
      *static, meta_params, jax.random.split(estimate_key, repeats), data)
  stats = jax.tree.map(lambda s: np.mean(np.asarray(s, np.float64), axis=0), stats)

  slice_losses = np.asarray(slice_losses, np.float64)
  report = {
      "task": task.name,
      "lengths": list(lengths),
      "seed": seed,
      "num_particles": est_config.num_particles,
      "repeats": repeats,
      "slice": {
          "alphas": np.asarray(alphas, np.float64).tolist(),
          "radius": float(slice_radius),
          "meta_loss": slice_losses.tolist(),
          "roughness": np.sqrt(np.mean(np.square(np.diff(slice_losses, 2, axis=1)),
                                       axis=1)).tolist(),
      },
      "meta_loss": stats["meta_loss"].tolist(),
      "pathwise_norm": stats["norm"]["pathwise"].tolist(),
      "pathwise_sample_norm": stats["pathwise_sample_norm"].tolist(),
      "norm": {name: value.tolist() for name, value in stats["norm"].items()},
      "variance": {name: value.tolist() for name, value in stats["variance"].items()},
      "es_weight": stats["es_weight"].tolist(),
      "files": [JSON_FILE, *PLOT_FILES.values()],
      "config": config.to_dict(),
  }
  report = jsonable(report)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  atomic_write(out_dir / JSON_FILE, json.dumps(report, indent=2))
  _plot(report, out_dir)
  return report


# -- computation (jitted) ---------------------------------------------------------------


def _estimator_config(config: RunConfig, lengths: tuple[int, ...]
                      ) -> tuple[estimators.EstimatorConfig, truncation.TruncationConfig, int]:
  """The run's estimator settings for fresh unrolls covering ``max(lengths)`` steps.

  Returns:
    ``(est_config, trunc_config, num_segments)``: the unroll is ``num_segments``
    truncations of ``config.truncation.length`` steps (at most ``max(lengths)``), enough to
    cover every length, in one run whose horizon is their total (so it never resets) and
    without stagger. The meta-loss is measured after every step (``meta_loss_every=1``) so
    that every prefix length is scored.
  """
  segment = min(config.truncation.length, max(lengths))
  num_segments = math.ceil(max(lengths) / segment)
  est_config = dataclasses.replace(config.estimator, name="es")
  trunc_config = dataclasses.replace(
      config.truncation, length=segment, min_horizon=segment * num_segments,
      max_horizon=segment * num_segments, stagger=False, meta_loss_every=1)
  return est_config, trunc_config, num_segments


def _long_unroll(task: base.Task, lopt: truncation.LearnedOptimizerLike,
                 config: truncation.TruncationConfig, num_segments: int,
                 meta_params: MetaParams, state: truncation.InnerState, data: base.Data
                 ) -> truncation.UnrollOutput:
  """``num_segments`` consecutive truncations of one run, outputs ``[num_segments * T]``.

  Each truncation is rematerialised in the backward pass (``jax.checkpoint``), so
  backpropagating through the whole unroll stores one truncation's intermediate values and
  the inner state between truncations instead of every step's intermediates.
  """
  @jax.checkpoint
  def segment(theta, state):
    return truncation.unroll(task, lopt, config, theta, state, data)

  _, outputs = jax.lax.scan(lambda s, _: segment(meta_params, s), state, length=num_segments)
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), outputs)


def _prefix_means(losses: jax.Array, lengths: tuple[int, ...]) -> jax.Array:
  """``[mean(losses[..., :L]) for L in lengths]`` along a new last axis."""
  return jnp.stack([jnp.mean(losses[..., :length], axis=-1) for length in lengths], axis=-1)


def _slice_losses(task: base.Task, lopt: truncation.LearnedOptimizerLike,
                  config: estimators.EstimatorConfig, trunc: truncation.TruncationConfig,
                  num_segments: int,
                  lengths: tuple[int, ...], meta_params: MetaParams, direction: MetaParams,
                  alphas: jax.Array, key: chex.PRNGKey, data: base.Data) -> jax.Array:
  """Meta-losses ``[len(lengths), len(alphas)]`` at ``meta_params + alpha * direction``.

  Each alpha is scored on the same ``config.num_tasks`` fresh runs (common random numbers),
  so the curves show the surface, not sampling noise.
  """
  run_keys = jax.random.split(key, config.num_tasks)

  def loss(alpha, run_key):
    theta = jax.tree.map(lambda m, d: m + alpha * d, meta_params, direction)
    state = truncation.init_inner_state(task, lopt, theta, trunc, run_key)
    out = _long_unroll(task, lopt, trunc, num_segments, theta, state, data)
    return _prefix_means(out.meta_losses, lengths)

  losses = jax.vmap(jax.vmap(loss, in_axes=(None, 0)), in_axes=(0, None))(alphas, run_keys)
  return jnp.mean(losses, axis=1).T


def _length_statistics(task: base.Task, lopt: truncation.LearnedOptimizerLike,
                       config: estimators.EstimatorConfig, trunc: truncation.TruncationConfig,
                       num_segments: int,
                       lengths: tuple[int, ...], meta_params: MetaParams, keys: jax.Array,
                       data: base.Data) -> dict[str, Any]:
  """Per-length estimator statistics, one row per key (``lax.map``: sequential repeats)."""
  return jax.lax.map(lambda k: _one_estimate(task, lopt, config, trunc, num_segments, lengths,
                                             meta_params, k, data), keys)


def _one_estimate(task: base.Task, lopt: truncation.LearnedOptimizerLike,
                  config: estimators.EstimatorConfig, trunc: truncation.TruncationConfig,
                  num_segments: int,
                  lengths: tuple[int, ...], meta_params: MetaParams, key: chex.PRNGKey,
                  data: base.Data) -> dict[str, Any]:
  """Every estimator's samples for every length from one set of antithetic particles."""
  unroll = functools.partial(_long_unroll, task, lopt, trunc, num_segments)
  init_key, eps_key = jax.random.split(key)
  states = estimators.Estimator(task, lopt, config, trunc).init(meta_params, init_key,
                                                                data).positive
  eps = particles.sample_perturbations(meta_params, eps_key, config.num_particles, config.sigma)
  theta_pos = jax.tree.map(jnp.add, meta_params, eps)
  theta_neg = jax.tree.map(jnp.subtract, meta_params, eps)

  def pathwise(theta, state):
    def prefix_losses(theta):
      out = unroll(theta, state, data)
      return _prefix_means(out.meta_losses, lengths), out
    means, vjp, out = jax.vjp(prefix_losses, theta, has_aux=True)
    (rows,) = jax.vmap(vjp)(jnp.eye(len(lengths), dtype=means.dtype))
    return rows, out

  # rp_rows: leaves [S, len(lengths), ...]; out_pos/out_neg fields [S, max(lengths)].
  rp_rows, out_pos = jax.vmap(pathwise)(theta_pos, states)
  out_neg = jax.vmap(unroll, in_axes=(0, 0, None))(theta_neg, states, data)
  differences = out_pos.meta_losses - out_neg.meta_losses
  zeros = jax.tree.map(jnp.zeros_like, eps)

  rows = []
  for i, length in enumerate(lengths):
    samples = {
        "pathwise": jax.tree.map(lambda r, i=i: r[:, i], rp_rows),
        "es": estimators.antithetic_es_gradient(
            eps, jnp.mean(differences[:, :length], axis=1), config.sigma),
        "pes": estimators.pes_gradient(eps, zeros, differences[:, :length],
                                       out_pos.resets[:, :length], config.sigma)[0],
    }
    # From fresh runs, one perturbation shapes the whole unroll: NRES's estimate is PES's.
    samples["nres"] = samples["pes"]
    _, es_weight = estimators.merge_by_inverse_variance(samples["pathwise"],
                                                        samples[config.merged_es])
    samples["merged"] = jax.tree.map(
        lambda rp, es, w: (1 - w) * rp + w * es,
        samples["pathwise"], samples[config.merged_es], es_weight)
    sample_norms = jax.vmap(particles.global_norm)(samples["pathwise"])
    rows.append({
        "meta_loss": 0.5 * (jnp.mean(out_pos.meta_losses[:, :length])
                            + jnp.mean(out_neg.meta_losses[:, :length])),
        "norm": {name: particles.global_norm(particles.mean_over_samples(s))
                 for name, s in samples.items()},
        "variance": {name: particles.mean_variance(s) for name, s in samples.items()},
        "pathwise_sample_norm": jnp.sqrt(jnp.mean(jnp.square(sample_norms))),
        "es_weight": particles.mean_over_elements(es_weight),
    })
  return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


def _unit_direction(tree: MetaParams, key: chex.PRNGKey) -> MetaParams:
  """A uniformly random direction of unit global norm, shaped like ``tree``."""
  direction = particles.normal_like(tree, key)
  norm = particles.global_norm(direction)
  return jax.tree.map(lambda d: d / norm, direction)


# -- output ------------------------------------------------------------------------------


def _plot(report: dict[str, Any], out_dir: pathlib.Path) -> None:
  """Draws the three figures of the report into ``out_dir``."""
  lengths = report["lengths"]
  colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(lengths)))

  fig, ax = plt.subplots(figsize=(5.5, 4))
  alphas = float_array(report["slice"]["alphas"])
  for length, curve, color in zip(lengths, report["slice"]["meta_loss"], colors, strict=True):
    ax.plot(alphas, float_array(curve), color=color, label=f"{length} steps")
  ax.set_xlabel(r"$\alpha$ (weights + $\alpha$ $\cdot$ random unit direction)")
  ax.set_ylabel("meta-loss")
  ax.set_title(f"meta-loss slice, {report['task']}")
  ax.legend(fontsize="small")
  _save(fig, out_dir / PLOT_FILES["slice"])

  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.plot(lengths, float_array(report["pathwise_norm"]), "o-", label="norm of the estimate")
  ax.plot(lengths, float_array(report["pathwise_sample_norm"]), "s--",
          label="RMS per-sample norm")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("unroll length (inner steps)")
  ax.set_ylabel("pathwise meta-gradient norm")
  ax.set_title(f"pathwise gradient norm, {report['task']}")
  ax.legend(fontsize="small")
  _save(fig, out_dir / PLOT_FILES["norm"])

  fig, ax = plt.subplots(figsize=(5.5, 4))
  styles = {"pathwise": "o-", "es": "s-", "pes": "x--", "nres": "+:", "merged": "d-"}
  for name, values in report["variance"].items():
    ax.plot(lengths, float_array(values), styles.get(name, "o-"), label=name)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("unroll length (inner steps)")
  ax.set_ylabel("per-sample variance (mean over elements)")
  ax.set_title(f"estimator variance, {report['task']}")
  ax.legend(fontsize="small")
  _save(fig, out_dir / PLOT_FILES["variance"])


def _save(fig, path: pathlib.Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
