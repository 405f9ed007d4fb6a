"""The learned optimizer in Flax training loops (linen TrainState and nnx.Optimizer) and Orbax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.training import train_state

import optax_learned


def _regression_data(seed=0, n=64, dim=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim)).astype(np.float32)
  y = np.sin(x @ rng.normal(size=(dim, 1))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


class _LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(8)(x)))


def _linen_state(tx, seed=0):
  model = _LinenMLP()
  x, _ = _regression_data()
  params = jax.jit(model.init)(jax.random.key(seed), x[:1])["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@jax.jit
def _linen_step(state, x, y):
  def loss_fn(params):
    return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def test_linen_train_state_loss_goes_down(descent_optimizer):
  lopt, meta_params = descent_optimizer
  state = _linen_state(lopt.transform(meta_params))
  x, y = _regression_data()
  losses = []
  for _ in range(80):
    state, loss = _linen_step(state, x, y)
    losses.append(float(loss))
  # A width-scaled QH-Adam: a descent method, so small steps lower the loss.
  assert all(b < a for a, b in zip(losses[:10], losses[1:11], strict=True)), losses[:11]
  assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
  assert int(state.opt_state.count) == 80 and int(state.step) == 80
  # The state is Adam's layout: params-shaped float32 accumulators.
  for accumulator in (state.opt_state.mu, state.opt_state.nu):
    assert jax.tree.structure(accumulator) == jax.tree.structure(state.params)
    for a, p in zip(jax.tree.leaves(accumulator), jax.tree.leaves(state.params), strict=True):
      assert a.shape == p.shape and a.dtype == jnp.float32


def test_linen_train_state_with_random_weights_moves_and_stays_finite():
  """An untrained optimizer (output_init_scale=1) makes no promise but moves finitely."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(8,), output_init_scale=1.0)
  state = _linen_state(lopt.transform(lopt.init(jax.random.key(3))))
  start = state.params
  x, y = _regression_data()
  for _ in range(10):
    state, loss = _linen_step(state, x, y)
  assert np.isfinite(float(loss))
  assert _all_finite(state.params) and _all_finite(state.opt_state)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, start)
  assert all(m > 0 for m in jax.tree.leaves(moved)), moved


class _NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(3, 8, rngs=rngs)
    self.out = nnx.Linear(8, 1, rngs=rngs)
    self.calls = nnx.Variable(jnp.asarray(0, jnp.int32))  # not a Param: not optimised

  def __call__(self, x):
    self.calls[...] += 1
    return self.out(jnp.tanh(self.hidden(x)))


def test_nnx_optimizer_loss_goes_down(descent_optimizer):
  lopt, meta_params = descent_optimizer
  model = _NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, lopt.transform(meta_params), wrt=nnx.Param)
  x, y = _regression_data()

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda model: jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)  # extra args reach (and are ignored by) tx
    return loss

  losses = [float(step(model, optimizer, x, y)) for _ in range(80)]
  assert all(b < a for a, b in zip(losses[:10], losses[1:11], strict=True)), losses[:11]
  assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
  assert int(optimizer.step[...]) == 80
  assert int(model.calls[...]) == 80


def test_train_state_checkpoint_resumes_bit_identically(descent_optimizer, tmp_path):
  """Orbax saves a TrainState holding the learned optimizer's state; training resumed from
  the restored state matches uninterrupted training bit for bit."""
  lopt, meta_params = descent_optimizer
  x, y = _regression_data()
  state = _linen_state(lopt.transform(meta_params))
  for _ in range(3):
    state, _ = _linen_step(state, x, y)
  assert int(state.opt_state.count) == 3

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpointer.restore(tmp_path / "state", target)

  assert isinstance(restored.opt_state, optax_learned.LearnedOptimizerState)
  assert restored.opt_state.count.dtype == jnp.int32
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  uninterrupted, resumed = state, restored
  for _ in range(3):
    uninterrupted, loss_a = _linen_step(uninterrupted, x, y)
    resumed, loss_b = _linen_step(resumed, x, y)
    assert float(loss_a) == float(loss_b)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(resumed.opt_state.count) == 6


def test_bfloat16_flax_params(descent_optimizer):
  """(float16 leaves are covered, with exact values, in test_learned_optimizer.py.)"""
  dtype = jnp.bfloat16
  lopt, meta_params = descent_optimizer
  model = _LinenMLP()
  x, y = _regression_data()
  params = jax.tree.map(lambda p: p.astype(dtype),
                        jax.jit(model.init)(jax.random.key(0), x[:1])["params"])
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=lopt.transform(meta_params))
  for _ in range(3):
    state, loss = _linen_step(state, x.astype(dtype), y.astype(dtype))
  assert all(p.dtype == dtype for p in jax.tree.leaves(state.params))
  assert _all_finite(state.params) and np.isfinite(float(loss))
