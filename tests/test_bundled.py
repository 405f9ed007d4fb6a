"""The bundled optimizers: listed, loadable, useful and deterministic."""

import jax
import numpy as np
import optax

import optax_learned
from metatrain.tasks import get_task
from metatrain.tasks.convnet import ConvNetTask


def _train(task, tx, batch_at, steps):
  """Losses and final parameters of ``steps`` jitted steps on ``batch_at(t)``."""
  params = task.init_params(jax.random.PRNGKey(0))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for t in range(steps):
    params, opt_state, loss = step(params, opt_state, batch_at(t))
    losses.append(float(loss))
  return np.asarray(losses), params


def _assert_identical_runs(run, again):
  np.testing.assert_array_equal(run[0], again[0])
  for a, b in zip(jax.tree.leaves(run[1]), jax.tree.leaves(again[1]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_digits_is_listed_with_a_description_and_a_model_card():
  available = optax_learned.available()
  assert "digits" in available and available["digits"]
  from optax_learned._src import checkpoint  # pylint: disable=import-outside-toplevel
  assert (checkpoint.bundled_root() / "digits" / "MODEL_CARD.md").is_file()


def test_digits_trains_the_digits_mlp_and_is_deterministic():
  task = get_task("digits_mlp")
  data = task.load_data()
  batch_at = lambda t: task.sample_batch(data, jax.random.PRNGKey(t), "train")
  losses, params = _train(task, optax_learned.load("digits"), batch_at, 60)
  _assert_identical_runs((losses, params),
                         _train(task, optax_learned.load("digits"), batch_at, 60))
  assert losses[-10:].mean() < 0.5 * losses[:5].mean()


def test_cifar_is_listed_with_a_description_and_a_model_card():
  available = optax_learned.available()
  assert "cifar" in available and "CIFAR-10" in available["cifar"]
  from optax_learned._src import checkpoint  # pylint: disable=import-outside-toplevel
  assert (checkpoint.bundled_root() / "cifar" / "MODEL_CARD.md").is_file()


def test_cifar_trains_a_convnet_in_an_optax_chain_deterministically():
  # CIFAR-shaped synthetic data (tests never read ../shared): each image is its class's fixed
  # random pattern plus noise, which the 16x16 ConvNet can learn.
  task = ConvNetTask(resolution=16, batch_size=32)
  rng = np.random.default_rng(0)
  patterns = rng.normal(size=(10, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=256)
  images = 0.5 * rng.normal(size=(256, 16, 16, 3)).astype(np.float32) + patterns[labels]

  def batch_at(t):
    index = np.arange(t * 32, (t + 1) * 32) % 256
    return {"image": images[index], "label": labels[index]}

  def cifar():
    return optax.chain(optax.clip_by_global_norm(1.0), optax_learned.load("cifar"))

  losses, params = _train(task, cifar(), batch_at, 40)
  _assert_identical_runs((losses, params), _train(task, cifar(), batch_at, 40))
  assert np.all(np.isfinite(losses))
  assert losses[-8:].mean() < 0.7 * losses[:4].mean(), losses
