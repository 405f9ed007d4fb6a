"""Tests of the digits and ConvNet tasks, the convolutions, and the task registry/families."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metatrain import data as data_lib
from metatrain import tasks
from metatrain.tasks import convnet
from metatrain.tasks.cifar import MLPTask
from metatrain.tasks.convnet import ConvNetTask


@pytest.fixture
def cifar_dir(tmp_path):
  """A directory with a tiny synthetic CIFAR-10 training split (60 rows)."""
  rng = np.random.default_rng(0)
  np.savez(tmp_path / data_lib.TRAIN_FILE,
           x=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
           y=(np.arange(60) % 10).astype(np.uint8))
  return str(tmp_path)


def tiny_convnet(cifar_dir, **overrides):
  config = dict(width=8, batch_size=16, resolution=8, data_dir=cifar_dir, validation_size=10)
  config.update(overrides)
  return tasks.get_task("cifar_conv_8", **config)


def adam_losses(task, data, steps, fixed_batch=False):
  """Losses on one training batch before and after ``steps`` Adam steps (one jit, in scan)."""
  opt = optax.adam(1e-2)

  @jax.jit
  def run(data):
    params = task.init_params(jax.random.key(0))
    eval_batch = task.sample_batch(data, jax.random.key(1), "train")

    def step(carry, key):
      params, state = carry
      batch = eval_batch if fixed_batch else task.sample_batch(data, key, "train")
      updates, state = opt.update(jax.grad(task.loss)(params, batch), state)
      return (optax.apply_updates(params, updates), state), None

    keys = jax.random.split(jax.random.key(2), steps)
    (final, _), _ = jax.lax.scan(step, (params, opt.init(params)), keys)
    return task.loss(params, eval_batch), task.loss(final, eval_batch)

  return tuple(float(loss) for loss in run(data))


def test_digits_batches_and_training():
  task = tasks.get_task("digits_mlp", batch_size=32)
  data = task.load_data()
  assert data["train"]["x"].shape == (1438, 64) and data["valid"]["x"].shape == (359, 64)
  assert 0.0 <= float(data["train"]["x"].min()) and float(data["train"]["x"].max()) <= 1.0
  batch = jax.jit(lambda d, k: task.sample_batch(d, k, "valid"))(data, jax.random.key(0))
  chex.assert_shape(batch["x"], (32, 64))
  chex.assert_shape(batch["y"], (32,))
  chex.assert_type([batch["x"], batch["y"]], [jnp.float32, jnp.int32])
  before, after = adam_losses(task, data, steps=60)
  assert np.isfinite(before) and after < 0.5 * before
  accuracy = jax.jit(lambda b: task.accuracy(task.init_params(jax.random.key(0)), b))(batch)
  assert 0.0 <= float(accuracy) <= 1.0


def test_convnet_batches_and_training(cifar_dir):
  task = tiny_convnet(cifar_dir)
  data = task.load_data()
  chex.assert_shape(data["train"]["image"], (50, 8, 8, 3))
  chex.assert_type(data["valid"]["image"], jnp.uint8)
  batch = jax.jit(lambda d, k: task.sample_batch(d, k, "train"))(data, jax.random.key(0))
  chex.assert_shape(batch["image"], (16, 8, 8, 3))
  chex.assert_type([batch["image"], batch["label"]], [jnp.float32, jnp.int32])
  before, after = adam_losses(task, data, steps=20, fixed_batch=True)
  assert np.isfinite(before) and after < 0.7 * before


def test_convnet_data_is_cached_per_resolution(cifar_dir):
  a = tiny_convnet(cifar_dir, width=4).load_data()
  assert tiny_convnet(cifar_dir, depth=2, activation="tanh").load_data() is a
  b = tiny_convnet(cifar_dir, resolution=16).load_data()
  assert b is not a and b["train"]["image"].shape == (50, 16, 16, 3)


def test_convnet_validates_on_holdout_rows_when_asked(cifar_dir):
  meta = tiny_convnet(cifar_dir, validation_size=10, holdout_size=5).load_data()
  held = tiny_convnet(cifar_dir, validation_size=10, holdout_size=5,
                      validate_on="holdout").load_data()
  pooled = data_lib.resize_images(np.load(f"{cifar_dir}/{data_lib.TRAIN_FILE}")["x"], 8)
  np.testing.assert_array_equal(meta["train"]["image"], pooled[:45])
  np.testing.assert_array_equal(held["train"]["image"], pooled[:45])
  np.testing.assert_array_equal(meta["valid"]["image"], pooled[45:55])
  np.testing.assert_array_equal(held["valid"]["image"], pooled[55:])


def test_convnet_rejects_bad_validate_on_and_low_resolution_data(cifar_dir, tmp_path):
  with pytest.raises(ValueError, match="validate_on must be one of"):
    tiny_convnet(cifar_dir, validate_on="test")
  with pytest.raises(ValueError, match="needs holdout_size > 0"):
    tiny_convnet(cifar_dir, validate_on="holdout")
  low = tmp_path / "low"
  low.mkdir()
  np.savez(low / data_lib.TRAIN_FILE, x=np.zeros((60, 8, 8, 3), np.uint8), y=np.arange(60) % 10)
  assert tiny_convnet(str(low)).load_data()["train"]["image"].shape == (50, 8, 8, 3)
  with pytest.raises(data_lib.InvalidDataError, match="resolution 16 needs images"):
    tiny_convnet(str(low), resolution=16).load_data()


@pytest.mark.parametrize("size, stride", [(32, 2), (7, 2), (9, 1)])
def test_patches_conv_matches_lax(size, stride):
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(2, size, size, 5)), rng.normal(size=(3, 3, 5, 4))
  cotangent = rng.normal(size=(2, -(-size // stride), -(-size // stride), 4))

  @jax.jit
  def output_and_grads(x, w, cotangent):
    def apply(conv):
      return jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w, stride) * cotangent),
                                argnums=(0, 1))(x, w) + (conv(x, w, stride),)
    return apply(convnet.conv_patches), apply(convnet.conv_lax)

  patches, reference = output_and_grads(*(jnp.asarray(a, jnp.float32) for a in (x, w, cotangent)))
  chex.assert_trees_all_close(patches, reference, atol=1e-4)


def test_conv_impls_give_same_loss_and_gradient(cifar_dir):
  fast, ref = tiny_convnet(cifar_dir), tiny_convnet(cifar_dir, conv_impl="lax")

  @jax.jit
  def loss_and_grad(data, key):
    params, batch = fast.init_params(key), fast.sample_batch(data, key, "train")
    return (jax.value_and_grad(fast.loss)(params, batch),
            jax.value_and_grad(ref.loss)(params, batch))

  chex.assert_trees_all_close(*loss_and_grad(fast.load_data(), jax.random.key(0)), atol=1e-5)


@pytest.mark.parametrize("name", ["digits_mlp", "cifar_conv_8", "linear_regression"])
def test_sample_batch_and_loss_under_jit_and_vmap(name, cifar_dir):
  overrides = {"data_dir": cifar_dir, "validation_size": 10} if name.startswith("cifar") else {}
  task = tasks.get_task(name, batch_size=8, **overrides)
  data = task.load_data()
  keys = jax.random.split(jax.random.key(0), 3)

  @jax.jit
  def losses(data, keys):
    params = jax.vmap(task.init_params)(keys)
    batches = jax.vmap(lambda k: task.sample_batch(data, k, "train"))(keys)
    return jax.vmap(task.loss)(params, batches), batches

  values, batches = losses(data, keys)
  chex.assert_shape(values, (3,))
  chex.assert_tree_all_finite(values)
  assert all(leaf.shape[:2] == (3, 8) for leaf in jax.tree.leaves(batches))
  first = jax.tree.leaves(batches)[0]
  assert not np.array_equal(first[0], first[1])  # different keys, different batches


def test_bad_split_is_rejected():
  task = tasks.get_task("digits_mlp")
  with pytest.raises(ValueError, match="split"):
    task.sample_batch(task.load_data(), jax.random.key(0), "test")


def test_registry():
  names = tasks.task_names()
  for name in ("linear_regression", "digits_mlp", "cifar_conv_8", "cifar_conv_16",
               "cifar_conv_32", "cifar_conv_32_w64"):
    assert isinstance(names[name], str) and names[name]
    hash(tasks.get_task(name))
  assert tasks.get_task("cifar_conv_32_w64").width == 64
  assert tasks.get_task("cifar_conv_16", batch_size=32).batch_size == 32
  assert tasks.get_task("digits_mlp", hidden_sizes=[8, 8]).hidden_sizes == (8, 8)
  with pytest.raises(ValueError, match="known tasks"):
    tasks.get_task("mnist")
  with pytest.raises(ValueError, match="no field"):
    tasks.get_task("digits_mlp", widht=3)
  with pytest.raises(ValueError, match="activation"):
    tasks.get_task("cifar_conv_8", activation="sigmoidal")
  with pytest.raises(ValueError, match="resolution"):
    tasks.get_task("cifar_conv_8", resolution=12)


@pytest.mark.parametrize("name", tasks.family_names())
def test_family_sampling_is_deterministic_and_valid(name, cifar_dir):
  overrides = {}
  if name in ("cifar_conv", "cifar"):
    overrides = {"data_dir": cifar_dir, "validation_size": 10, "batch_sizes": (4,),
                 "resolutions": (8, 16)}
  family = tasks.get_family(name, **overrides)
  assert family.sample(3) == family.sample(3)
  assert family.sample(jax.random.key(3)) == family.sample(jax.random.key(3))
  assert family.sample(jax.random.PRNGKey(3)) == family.sample(jax.random.key(3))
  samples = [family.sample(seed) for seed in range(6)]
  assert len(set(samples)) > 1
  for task in samples[:2]:
    assert np.isfinite(float(initial_loss(task, task.load_data()))), task


def test_cifar_family_covers_heads_norms_and_mlps(cifar_dir):
  family = tasks.get_family("cifar", data_dir=cifar_dir, validation_size=10)
  samples = [family.sample(seed) for seed in range(40)]
  kinds = {type(task).__name__ for task in samples}
  assert kinds == {"ConvNetTask", "MLPTask"}
  convnets = [task for task in samples if isinstance(task, ConvNetTask)]
  assert {task.head for task in convnets} == {"pool", "flatten"}
  assert {task.norm for task in convnets} == {False, True}


@pytest.mark.parametrize("head, norm", [("flatten", False), ("pool", True)])
def test_convnet_heads_and_norm_give_finite_losses_and_expected_leaves(cifar_dir, head, norm):
  task = ConvNetTask(resolution=8, batch_size=4, validation_size=10, data_dir=cifar_dir,
                     head=head, norm=norm, depth=2, width=8)
  params = task.init_params(jax.random.key(0))
  assert ("norm_0" in params) == norm
  # A flatten head reads every position of the last feature map (8x8 -> 2x2 after 2 strides).
  assert params["linear"]["w"].shape == ((8 * 2 * 2 if head == "flatten" else 8), 10)
  assert np.isfinite(float(initial_loss(task, task.load_data())))


def test_mlp_task_trains_on_pixels(cifar_dir):
  task = MLPTask(resolution=8, batch_size=16, validation_size=10, data_dir=cifar_dir,
                 hidden_sizes=(32,))
  params = task.init_params(jax.random.key(0))
  assert params["dense_0"]["w"].shape == (8 * 8 * 3, 32)
  data = task.load_data()
  loss = jax.jit(lambda p, k: task.loss(p, task.sample_batch(data, k, "train")))
  grad = jax.jit(jax.grad(lambda p, k: task.loss(p, task.sample_batch(data, k, "train"))))
  key = jax.random.key(1)
  before = float(loss(params, key))
  for _ in range(20):
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grad(params, key))
  assert float(loss(params, key)) < before


@functools.partial(jax.jit, static_argnums=0)
def initial_loss(task, data):
  """Validation loss at initialisation; the (hashable) task is a static argument."""
  key = jax.random.key(0)
  return task.loss(task.init_params(key), task.sample_batch(data, key, "valid"))

