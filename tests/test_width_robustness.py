"""The bundled ``cifar`` weights on one Flax model at widths 16 to 1024 (issue #13, item 3).

The same weights must train a model whatever its width, on every kind of leaf (conv kernels,
dense kernels, biases, norm scales), without the runaway growth of weights that the 0.1
optimizer showed on a wide MLP (first-layer RMS up 11x). The problem is a synthetic one (a
random teacher labels random images), so the test needs no dataset.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_learned

STEPS = 150


class _Model(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.width, (3, 3), strides=2)(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.LayerNorm()(nn.relu(nn.Dense(self.width)(x)))
    return nn.Dense(10)(x)


def _rms(tree):
  return {jax.tree_util.keystr(path): float(jnp.sqrt(jnp.mean(jnp.square(leaf))))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("width", [16, 128, 1024])
def test_one_set_of_weights_trains_every_width_without_runaway_leaves(width):
  key_x, key_teacher, key_init = jax.random.split(jax.random.key(width), 3)
  images = jax.random.normal(key_x, (512, 8, 8, 3))
  teacher = _Model(32)
  labels = jnp.argmax(teacher.apply(teacher.init(key_teacher, images[:1]), images), axis=-1)
  model = _Model(width)
  params = model.init(key_init, images[:1])
  tx = optax_learned.load("cifar")

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  @jax.jit
  def step(p, state, t):
    idx = jax.random.choice(jax.random.fold_in(key_x, t), 512, (64,), replace=False)
    loss, grads = jax.value_and_grad(loss_fn)(p, images[idx], labels[idx])
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  start_loss = float(loss_fn(params, images, labels))
  start_rms = _rms(params["params"])
  state = tx.init(params)
  trained = params
  for t in range(STEPS):
    trained, state, _ = step(trained, state, t)
  final_loss = float(loss_fn(trained, images, labels))

  assert np.isfinite(final_loss)
  assert final_loss < 0.6 * start_loss, (width, start_loss, final_loss)
  for path, rms in _rms(trained["params"]).items():
    if start_rms[path] > 0:  # biases start at 0, norm scales at 1
      assert rms < 3.0 * start_rms[path], (width, path, start_rms[path], rms)
    else:
      assert rms < 0.5, (width, path, rms)
