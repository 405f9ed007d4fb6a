"""Shared fixtures of the optax_learned tests."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_learned


def _descent_meta_params(lopt: optax_learned.LearnedOptimizer) -> optax_learned.MetaParams:
  """Weights that make the learned optimizer exactly a width-scaled QH-Adam.

  Every weight of the per-tensor network is zero, so its outputs are zero whatever the
  features: the log-step correction is 0 and the gradient mix is ``initial_gradient_mix``.
  ``log_base_step`` is ``log([matrix_step, vector_step])``. The update of each element is
  then ``-s * ((1 - q) * mu_hat + q * g) / (sqrt(nu_hat) + eps)`` with
  ``s = matrix_step / fan_in`` for tensors of two or more dimensions and ``s = vector_step``
  for vectors and scalars: Adam with a momentum/gradient mix, a descent method for small
  enough steps (its first step is sign descent).
  """
  weights = jax.tree.map(lambda spec: np.zeros(spec.shape, np.float32), lopt.meta_params_shapes())
  weights["log_base_step"] = np.log(np.asarray([lopt.matrix_step, lopt.vector_step],
                                               np.float32))
  return jax.tree.map(jnp.asarray, weights)


@pytest.fixture
def descent_meta_params() -> Callable[[optax_learned.LearnedOptimizer], optax_learned.MetaParams]:
  """Factory ``lopt -> meta_params`` of the width-scaled QH-Adam that ``lopt`` starts from.

  See ``_descent_meta_params``. (The factory of the per-element design took the index of
  the input feature to pass through; the per-tensor network has no per-element feature to
  choose, so there is no such argument.)
  """
  return _descent_meta_params


@pytest.fixture
def descent_optimizer(descent_meta_params):
  """A learned optimizer whose weights make it a width-scaled QH-Adam (a descent method)."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), matrix_step=0.05, vector_step=0.02)
  return lopt, descent_meta_params(lopt)
