"""Tests of benchmarks/decay_screen.py: the variants it screens are the decays they name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_learned
from benchmarks import decay_screen


def _step(tx, count):
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.linspace(0.0, 0.1, 4)}
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)
  state = tx.init(params)
  state = jax.tree.map(lambda x: jnp.asarray(count, x.dtype) if x.ndim == 0 and
                       jnp.issubdtype(x.dtype, jnp.integer) else x, state)
  return tx.update(grads, state, params)[0]


@pytest.mark.parametrize("count", [0, 500, 3000])
def test_the_checkpoints_own_decay_reproduces_load_and_a_variant_replaces_it(count):
  own = _step(decay_screen.variant_optimizer("1:1000:1", "cifar"), count)
  reference = _step(optax_learned.load("cifar"), count)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), own, reference)
  squared = _step(decay_screen.variant_optimizer("1.5:1000:2:2", "cifar"), count)
  factor = 1.5 / (1.0 + (count / 1000) ** 2) * (1.0 + count / 1000)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, factor * b, rtol=1e-5),
               squared, reference)


def test_adam_variant_and_a_malformed_variant():
  got = _step(decay_screen.variant_optimizer("adam:0.01", "cifar"), 0)
  jax.tree.map(np.testing.assert_allclose, got, _step(optax.adam(0.01), 0))
  with pytest.raises(ValueError, match="'1.5:1000' is none of"):
    decay_screen.variant_optimizer("1.5:1000", "cifar")


def test_weight_decay_variant_sets_only_the_weight_decay():
  lopt, meta_params = optax_learned.load_weights("cifar")
  for weight_decay in (0.0, 1e-3):
    got = _step(decay_screen.variant_optimizer(f"wd:{weight_decay}", "cifar"), 500)
    expected = _step(dataclasses.replace(lopt, weight_decay=weight_decay)
                     .transform(meta_params), 500)
    jax.tree.map(np.testing.assert_allclose, got, expected)
  plain, decayed = (_step(decay_screen.variant_optimizer(v, "cifar"), 500)
                    for v in ("wd:0", "wd:1e-3"))
  assert not np.allclose(plain["w"], decayed["w"])
  np.testing.assert_array_equal(plain["b"], decayed["b"])  # vectors do not decay
