"""Shared fixtures of the optax_learned tests."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_learned


def _descent_meta_params(lopt: optax_learned.LearnedOptimizer,
                         feature: int) -> optax_learned.MetaParams:
  """Weights that make the MLP output exactly ``d = x[feature]`` and ``m = 0``.

  Two relu units compute ``relu(x) - relu(-x) = x`` for the chosen (normalised) input
  feature; every other weight, and the time features' weights, are zero. The update is then
  ``-step_mult * x[feature]``: with ``feature=0`` (the gradient) this is gradient descent
  with the gradient of each leaf divided by its RMS, a descent direction.
  """
  if len(lopt.hidden_sizes) != 1 or lopt.hidden_sizes[0] < 2 or lopt.activation != "relu":
    raise ValueError("descent weights need one relu hidden layer of at least 2 units")
  weights = jax.tree.map(lambda spec: np.zeros(spec.shape, np.float32), lopt.meta_params_shapes())
  weights["layer_0"]["w"][feature, :2] = (1.0, -1.0)
  weights["layer_1"]["w"][:2, 0] = (1.0, -1.0)
  return jax.tree.map(jnp.asarray, weights)


@pytest.fixture
def descent_meta_params() -> Callable[..., optax_learned.MetaParams]:
  """Factory ``(lopt, feature=0) -> meta_params`` of exact per-leaf normalised descent.

  See ``_descent_meta_params``; feature 0 is the gradient, feature
  ``3 + len(momentum_decays)`` is ``g * rsqrt(v + eps)`` (sign descent on the first step).
  """
  return lambda lopt, feature=0: _descent_meta_params(lopt, feature)


@pytest.fixture
def descent_optimizer(descent_meta_params):
  """A learned optimizer whose weights make it per-leaf normalised gradient descent."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), step_mult=0.01)
  return lopt, descent_meta_params(lopt)
