"""The bundled optimizers: listed, loadable, useful and deterministic."""

import jax
import numpy as np
import optax

import optax_learned
from metatrain.tasks import get_task


def _train_digits(tx, steps=60, seed=0):
  task = get_task("digits_mlp")
  data = task.load_data()
  params = task.init_params(jax.random.PRNGKey(seed))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key, data):
    loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(data, key, "train"))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for t in range(steps):
    params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(t), data)
    losses.append(np.asarray(loss))
  return np.asarray(losses), params


def test_digits_is_listed_with_a_description_and_a_model_card():
  available = optax_learned.available()
  assert "digits" in available and available["digits"]
  from optax_learned._src import checkpoint  # pylint: disable=import-outside-toplevel
  assert (checkpoint.bundled_root() / "digits" / "MODEL_CARD.md").is_file()


def test_digits_trains_the_digits_mlp_and_is_deterministic():
  losses, params = _train_digits(optax_learned.load("digits"))
  again, params_again = _train_digits(optax_learned.load("digits"))
  np.testing.assert_array_equal(losses, again)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_again), strict=True):
    np.testing.assert_array_equal(a, b)
  assert losses[-10:].mean() < 0.5 * losses[:5].mean()
