"""Meta-gradient estimators: pathwise, antithetic ES, persistent and noise-reuse ES, and
their merge.

All of them estimate the gradient of the variational (Gaussian-smoothed) meta-objective
``E_eps[L(theta + eps)]``, ``eps ~ N(0, sigma^2 I)``, where ``L`` is the mean meta-loss over a
truncation of inner training. Samples are antithetic pairs ``theta +- eps``; the
``num_tasks * num_pairs`` particles are vectorised, and the pairs of one task instance share
its data, initialisation and horizons (common random numbers).

Where each idea lives:

* :mod:`~metatrain.estimators.pathwise`: :func:`pathwise_gradient`, backpropagation through
  the truncated unroll at ``theta + eps``;
* :mod:`~metatrain.estimators.es`: the ES sides, :class:`AntitheticES`
  (:func:`antithetic_es_gradient`, ``eps (L+ - L-) / (2 sigma^2)`` over one truncation) and
  :class:`PersistentES` (:func:`pes_gradient`, which adds the perturbations accumulated since
  the run's last reset and is unbiased for the whole inner run, Vicol et al. 2021) and
  :class:`NoiseReuseES` (one perturbation per episode, also unbiased for the whole run,
  without PES's growing sum of perturbations; Li et al. 2023);
* :mod:`~metatrain.estimators.combine`: the combiners, the mean and
  :func:`merge_by_inverse_variance` (per element, by the inverse of each side's variance
  across samples, Metz et al. 2019);
* :mod:`~metatrain.estimators.particles`: perturbations, :func:`map_particles` and the
  statistics of per-sample gradients;
* :mod:`~metatrain.estimators.estimator`: :class:`EstimatorConfig`, the registries
  :data:`ESTIMATORS` and :data:`ES_SIDES`, and :class:`Estimator`, which runs any of them.

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein 2019. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML. arXiv:1810.10180.
  Vicol, Metz, Sohl-Dickstein 2021. "Unbiased gradient estimation in unrolled computation
  graphs with persistent evolution strategies". ICML. arXiv:2112.13835.
  Li, Harrison, Sohl-Dickstein, Smith, Metz 2023. "Variance-reduced gradient estimation via
  noise-reuse in online evolution strategies". NeurIPS. arXiv:2304.12180.
"""

from metatrain.estimators.combine import merge_by_inverse_variance
from metatrain.estimators.es import (
    Antithetic,
    AntitheticES,
    ESSide,
    NoiseReuseES,
    NoiseReuseESState,
    PersistentES,
    PersistentESState,
    antithetic_es_gradient,
    pes_gradient,
)
from metatrain.estimators.estimator import (
    ES_SIDES,
    ESTIMATORS,
    Estimator,
    EstimatorConfig,
    EstimatorSpec,
    EstimatorState,
)
from metatrain.estimators.particles import map_particles, sample_perturbations
from metatrain.estimators.pathwise import pathwise_gradient

__all__ = (
    "ESTIMATORS",
    "ES_SIDES",
    "Antithetic",
    "AntitheticES",
    "ESSide",
    "Estimator",
    "EstimatorConfig",
    "EstimatorSpec",
    "EstimatorState",
    "NoiseReuseES",
    "NoiseReuseESState",
    "PersistentES",
    "PersistentESState",
    "antithetic_es_gradient",
    "map_particles",
    "merge_by_inverse_variance",
    "pathwise_gradient",
    "pes_gradient",
    "sample_perturbations",
)
