"""Tests of the learned optimizer transformation: reference maths, pytrees, errors, numerics."""

import functools
import math
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_learned
from optax_learned._src import learned_optimizer

# -- an independent float64 numpy reference --------------------------------------------------

_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    # jax.nn.gelu's default is the tanh approximation.
    "gelu": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                               * (x + 0.044715 * x ** 3))),
}


def _np_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def reference_step(lopt, meta_params, grads, params, state):
  """One step of the Metz et al. (2019) per-parameter MLP, written out in float64 numpy.

  Returns ``(updates, (count, momentum, second_moment))`` with dict trees of arrays.
  """
  count, momentum, second_moment = state
  w = _np_tree(meta_params)
  act = _ACTIVATIONS[lopt.activation]
  decays = np.asarray(lopt.momentum_decays)
  beta2 = lopt.second_moment_decay
  time = np.tanh(count / np.asarray(lopt.time_scales) - 1.0)
  num_layers = len(lopt.hidden_sizes) + 1
  updates, new_m, new_v = {}, {}, {}
  for key in grads:
    g = np.clip(np.asarray(grads[key], np.float64), -1e18, 1e18)
    p = np.asarray(params[key], np.float64)
    m_old = np.moveaxis(np.asarray(momentum[key], np.float64), 0, -1)  # decays last
    m = decays * m_old + (1 - decays) * g[..., None]
    v = beta2 * np.asarray(second_moment[key], np.float64) + (1 - beta2) * g * g
    r = 1.0 / np.sqrt(v + lopt.epsilon)
    columns = [g, p] + [m[..., i] for i in range(len(decays))] + [r, g * r] + [
        m[..., i] * r for i in range(len(decays))]
    x = np.stack([c.reshape(-1) for c in columns], axis=1)  # [n, num_features]
    for j in range(x.shape[1]):  # each column divided by its RMS (after scaling by its max)
      peak = np.max(np.abs(x[:, j]))
      col = x[:, j] / (peak if peak > 0 else 1.0)
      x[:, j] = col / np.sqrt(np.mean(col ** 2) + 1e-12)
    h = x
    for i in range(num_layers):
      bias = w[f"layer_{i}"]["b"] + (time @ w["time_w"] if i == 0 else 0.0)
      h = h @ w[f"layer_{i}"]["w"] + bias
      if i < num_layers - 1:
        h = act(h)
    step = lopt.step_mult * h[:, 0] * np.exp(lopt.exp_mult * h[:, 1])
    updates[key] = -step.reshape(p.shape)
    new_m[key], new_v[key] = np.moveaxis(m, -1, 0), v
  return updates, (count + 1, new_m, new_v)


def _random_meta_params(lopt, seed=0):
  """Random weights of ``lopt``'s shapes, biases included, so every weight matters.

  Drawn with numpy: eager ``jax.random`` would compile a kernel per shape.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda spec: jnp.asarray(rng.normal(size=spec.shape) / math.sqrt(spec.shape[0])
                               if len(spec.shape) == 2 else 0.3 * rng.normal(size=spec.shape),
                               jnp.float32),
      lopt.meta_params_shapes())


@functools.cache
def _jitted(lopt):
  """``(init, update)`` of ``lopt`` jitted with the weights as an argument.

  Tests of one configuration and tree shapes then share one compilation.
  """
  init = jax.jit(lambda meta_params, params: lopt.transform(meta_params).init(params))
  update = jax.jit(lambda meta_params, grads, state, params:
                   lopt.transform(meta_params).update(grads, state, params))
  return init, update


def _tiny_tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"b": jnp.asarray(scale * rng.normal(size=(3,)), jnp.float32),
          "s": jnp.asarray(scale * rng.normal(), jnp.float32),
          "w": jnp.asarray(scale * rng.normal(size=(2, 3)), jnp.float32)}


def _assert_close(actual, expected, rtol=2e-4):
  for key in expected:
    a, e = np.asarray(actual[key], np.float64), np.asarray(expected[key])
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.max(np.abs(e)) + 1e-30,
                               err_msg=key)


def _state_as_np(state):
  return int(state.count), _np_tree(state.momentum), _np_tree(state.second_moment)


@pytest.mark.parametrize("activation, hidden_sizes", [
    ("relu", (6,)), ("tanh", (5, 4)), ("gelu", (3,)), ("relu", ()),
])
def test_matches_numpy_reference_for_two_steps(activation, hidden_sizes):
  lopt = optax_learned.LearnedOptimizer(
      hidden_sizes=hidden_sizes, activation=activation, momentum_decays=(0.5, 0.9, 0.99),
      time_scales=(1.0, 10.0, 100.0), step_mult=0.1, exp_mult=0.5, output_init_scale=1.0)
  meta_params = _random_meta_params(lopt)
  init, update = _jitted(lopt)
  params, grads_1, grads_2 = _tiny_tree(0), _tiny_tree(1), _tiny_tree(2, scale=1e-3)

  state = init(meta_params, params)
  updates_1, state = update(meta_params, grads_1, state, params)
  expected_1, ref_state = reference_step(lopt, meta_params, grads_1, params,
                                         _state_as_np(init(meta_params, params)))
  _assert_close(updates_1, expected_1)
  params_1 = optax.apply_updates(params, updates_1)
  updates_2, state = update(meta_params, grads_2, state, params_1)
  expected_2, ref_state = reference_step(lopt, meta_params, grads_2, params_1, ref_state)
  _assert_close(updates_2, expected_2)

  assert int(state.count) == ref_state[0] == 2
  _assert_close(state.momentum, ref_state[1], rtol=1e-6)
  _assert_close(state.second_moment, ref_state[2], rtol=1e-6)


def test_matches_numpy_reference_from_a_late_state():
  """Time features at step 37 and non-zero accumulators enter as the reference says."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(8,), output_init_scale=1.0, exp_mult=0.3,
                                        step_mult=0.05)
  meta_params = _random_meta_params(lopt, seed=3)
  params, grads = _tiny_tree(4), _tiny_tree(5)
  rng = np.random.default_rng(6)
  state = optax_learned.LearnedOptimizerState(
      count=jnp.asarray(37, jnp.int32),
      momentum=jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(5,) + p.shape), jnp.float32),
                            params),
      second_moment=jax.tree.map(lambda p: jnp.asarray(rng.uniform(size=p.shape), jnp.float32),
                                 params))
  updates, new_state = _jitted(lopt)[1](meta_params, grads, state, params)
  expected, ref_state = reference_step(lopt, meta_params, grads, params, _state_as_np(state))
  _assert_close(updates, expected)
  assert int(new_state.count) == 38
  _assert_close(new_state.second_moment, ref_state[2], rtol=1e-6)


def test_first_step_of_sign_weights_is_sign_descent(descent_meta_params):
  """With d = normalised g / sqrt(v), the first step is exactly -step_mult * sign(g)."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(2,), step_mult=0.01)
  meta_params = descent_meta_params(lopt, feature=3 + len(lopt.momentum_decays))
  init, update = _jitted(lopt)
  grads = {"a": jnp.array([[0.5, -2.0, 3.0], [-1.0, 0.25, 4.0]]), "b": jnp.array([-7.0])}
  params = jax.tree.map(jnp.ones_like, grads)
  updates, _ = update(meta_params, grads, init(meta_params, params), params)
  for key in grads:
    np.testing.assert_allclose(updates[key], -0.01 * np.sign(grads[key]), rtol=1e-4)


def test_leaf_features_columns_have_unit_rms():
  lopt = optax_learned.LearnedOptimizer()
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
  p = jnp.asarray(1e20 * rng.normal(size=(7, 5)), jnp.float32)  # would overflow if squared

  @jax.jit
  def features_of(g, p):
    _, m, v = lopt._accumulate(g, jnp.zeros((5, 7, 5)), jnp.zeros((7, 5)))
    return lopt.leaf_features(g, p, m, v)

  features = features_of(g, p)
  assert features.shape == (35, lopt.num_features)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(features ** 2, axis=0)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
      learned_optimizer.normalize_columns(jnp.zeros((4, 3))), np.zeros((4, 3)))


# -- composition with Optax ------------------------------------------------------------------


def test_chain_with_clipping_and_weight_decay_equals_manual_composition():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(8,), output_init_scale=1.0)
  learned = lopt.transform(_random_meta_params(lopt))
  tx = optax.chain(optax.clip_by_global_norm(0.5), optax.add_decayed_weights(1e-2), learned)

  @jax.jit
  def both(grads, params):
    updates, _ = tx.update(grads, tx.init(params), params)
    clipped, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
    decayed = jax.tree.map(lambda g, p: g + 1e-2 * p, clipped, params)
    expected, _ = learned.update(decayed, learned.init(params), params)
    return updates, expected

  updates, expected = both(_tiny_tree(1, scale=10.0), _tiny_tree(0))
  chex.assert_trees_all_close(updates, expected, rtol=1e-6)


def test_chain_trains_a_quadratic(descent_optimizer):
  lopt, meta_params = descent_optimizer
  target = _tiny_tree(7)
  loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4),
                   lopt.transform(meta_params))
  params = jax.tree.map(jnp.zeros_like, target)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(60):
    params, state, value = step(params, state)
    losses.append(float(value))
  assert all(b < a for a, b in zip(losses[:20], losses[1:21], strict=True)), losses[:21]
  assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_masked_integer_leaves_as_the_error_message_suggests():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,))
  params = {"w": jnp.ones(3), "step": jnp.asarray(4, jnp.int32)}
  tx = optax.masked(lopt.transform(_random_meta_params(lopt)), {"w": True, "step": False})
  grads = {"w": jnp.ones(3), "step": jnp.asarray(0, jnp.int32)}
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert updates["w"].shape == (3,) and updates["w"].dtype == jnp.float32
  assert bool(jnp.any(updates["w"] != 0))


def test_apply_if_finite_composes():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  learned = _jitted_tx(lopt, _random_meta_params(lopt))
  tx = optax.apply_if_finite(learned, max_consecutive_errors=3)
  update = jax.jit(tx.update)
  params, grads = _tiny_tree(0), _tiny_tree(1)
  state = tx.init(params)

  bad = {**grads, "b": grads["b"].at[1].set(jnp.nan)}
  updates, bad_state = update(bad, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(bad_state.inner_state, state.inner_state)
  assert int(bad_state.notfinite_count) == 1

  updates, good_state = update(grads, bad_state, params)
  expected, expected_inner = learned.update(grads, learned.init(params), params)
  chex.assert_trees_all_close(updates, expected, rtol=1e-6)
  chex.assert_trees_all_close(good_state.inner_state, expected_inner, rtol=1e-6)
  assert int(good_state.notfinite_count) == 0


# -- pytrees ---------------------------------------------------------------------------------


def _lopt_tx(**kwargs):
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0, **kwargs)
  return lopt, lopt.transform(_random_meta_params(lopt))


def _jitted_tx(lopt, meta_params):
  """``lopt.transform(meta_params)`` with init and update jitted (sharing compilations)."""
  init, update = _jitted(lopt)
  return optax.GradientTransformationExtraArgs(
      init=functools.partial(init, meta_params),
      update=lambda g, s, p=None, **kw: update(meta_params, g, s, p))


def test_any_float_pytree_keeps_structure_shapes_and_dtypes():
  _, tx = _lopt_tx()
  params = {
      "nested": {"deeper": {"w": jnp.ones((2, 3, 4), jnp.float32)}, "list": [jnp.ones(2)]},
      "tuple": (jnp.full((3,), 2.0, jnp.bfloat16), jnp.full((2, 2), 0.5, jnp.float16)),
      "scalar": jnp.asarray(1.5, jnp.float32),
      "python_scalar": 2.0,
      "zero_size": jnp.ones((0, 3)),
      "none": None,
  }
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params, value=jnp.float32(3.0))
    return optax.apply_updates(params, updates), updates, state

  state = tx.init(params)
  for _ in range(2):
    new_params, updates, state = step(params, state)
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
    assert u.shape == jnp.shape(g) and u.dtype == jnp.result_type(g), (u, g)
    assert bool(jnp.all(jnp.isfinite(u)))
  assert updates["tuple"][0].dtype == jnp.bfloat16 and updates["tuple"][1].dtype == jnp.float16
  assert updates["python_scalar"].dtype == jnp.float32
  assert bool(jnp.any(updates["nested"]["deeper"]["w"] != 0))
  assert _all_finite(new_params) and int(state.count) == 2


def test_low_precision_leaves_match_float32_computation():
  """bf16 and f16 leaves get the float32 computation's update, cast to their dtype."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  tx = _jitted_tx(lopt, _random_meta_params(lopt))
  params32, grads32 = _tiny_tree(0), _tiny_tree(1)
  as_type = lambda tree, dtype: jax.tree.map(lambda x: x.astype(dtype), tree)
  for dtype in (jnp.bfloat16, jnp.float16):
    params, grads = as_type(params32, dtype), as_type(grads32, dtype)
    updates, _ = tx.update(grads, tx.init(params), params)
    reference, _ = tx.update(as_type(grads, jnp.float32), tx.init(params32),
                             as_type(params, jnp.float32))
    for key in params:
      assert updates[key].dtype == dtype
      np.testing.assert_array_equal(updates[key], reference[key].astype(dtype))


def test_empty_pytrees():
  _, tx = _lopt_tx()
  # (``None`` is not among them: for Optax it means that no params were passed.)
  for empty in ({}, [], (), {"a": {}, "b": [None]}):
    state = tx.init(empty)
    updates, new_state = tx.update(empty, state, empty)
    assert updates == empty
    assert int(new_state.count) == 1


def test_extra_arguments_are_ignored():
  _, tx = _lopt_tx()
  params, grads = _tiny_tree(0), _tiny_tree(1)
  state = tx.init(params)
  plain = jax.jit(tx.update)(grads, state, params)
  with_extras = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.sum(g["w"]), grad=g,
                                                 anything=3))(grads, state, params)
  chex.assert_trees_all_equal(plain, with_extras)


def test_vmap_over_meta_params_and_scan():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  batch = jax.tree.map(lambda *xs: jnp.stack(xs),
                       *[_random_meta_params(lopt, seed) for seed in range(3)])
  params, grads = _tiny_tree(0), _tiny_tree(1)

  def run(meta_params):
    tx = lopt.transform(meta_params)

    def body(carry, _):
      params, state = carry
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params_out, state), _ = jax.lax.scan(body, (params, tx.init(params)), length=3)
    return params_out, state.count

  out, counts = jax.jit(jax.vmap(run))(batch)
  assert counts.tolist() == [3, 3, 3]
  run = jax.jit(run)
  for i in range(3):
    take = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)
    single, _ = run(take(batch))
    chex.assert_trees_all_close(take(out), single, rtol=1e-5, atol=1e-7)


def test_no_recompilation_across_steps():
  lopt, tx = _lopt_tx()
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(None)  # runs only while tracing
    updates, state = tx.update(grads, state, params, value=jnp.sum(grads["w"]))
    return optax.apply_updates(params, updates), state

  params, state = _tiny_tree(0), tx.init(_tiny_tree(0))
  for i in range(6):
    params, state = step(params, state, _tiny_tree(10 + i))
  assert len(traces) == 1
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert int(state.count) == 6


# -- bad inputs ------------------------------------------------------------------------------


def test_update_without_params_raises_missing_params():
  _, tx = _lopt_tx()
  params = _tiny_tree(0)
  with pytest.raises(optax_learned.MissingParamsError, match=r"needs the current parameters"):
    tx.update(params, tx.init(params))
  with pytest.raises(optax_learned.MissingParamsError):
    tx.update(params, tx.init(params), None, value=1.0)


@pytest.mark.parametrize("bad_leaf", [jnp.asarray([1, 2], jnp.int32), jnp.asarray(True),
                                      jnp.asarray([1 + 2j]), 3])
def test_non_float_leaf_raises_invalid_tree_naming_its_path(bad_leaf):
  _, tx = _lopt_tx()
  params = {"layer": {"w": jnp.ones(2), "count": bad_leaf}}
  with pytest.raises(optax_learned.InvalidTreeError, match=re.escape("params['layer']['count']")):
    tx.init(params)
  good = {"layer": {"w": jnp.ones(2), "count": jnp.ones(jnp.shape(bad_leaf))}}
  state = tx.init(good)
  with pytest.raises(optax_learned.InvalidTreeError,
                     match=re.escape("updates['layer']['count']") + ".*dtype"):
    tx.update(params, state, good)
  with pytest.raises(optax_learned.InvalidTreeError, match=re.escape("params['layer']['count']")):
    tx.update(good, state, params)


def test_non_array_leaf_raises_invalid_tree():
  _, tx = _lopt_tx()
  with pytest.raises(optax_learned.InvalidTreeError, match=r"params\['name'\] is a str"):
    tx.init({"name": "conv", "w": jnp.ones(2)})


def test_tree_of_another_structure_raises_invalid_tree():
  _, tx = _lopt_tx()
  params = _tiny_tree(0)
  state = tx.init(params)
  other = {"w": params["w"], "b": params["b"]}
  with pytest.raises(optax_learned.InvalidTreeError, match=r"different tree structure"):
    tx.update(other, state, params)
  with pytest.raises(optax_learned.InvalidTreeError, match=r"params has a different tree"):
    tx.update(params, state, other)
  with pytest.raises(optax_learned.InvalidTreeError, match=r"initialised for other parameters"):
    tx.update(other, tx.init(other), params)


def test_shape_mismatch_is_caught_by_chex():
  _, tx = _lopt_tx()
  params = _tiny_tree(0)
  wrong = {**params, "w": jnp.ones((3, 2))}
  with pytest.raises(AssertionError, match=r"shapes"):
    tx.update(wrong, tx.init(params), params)
  with pytest.raises(AssertionError, match=r"shapes"):
    tx.update(params, tx.init(wrong), params)


def test_updates_are_checked_against_params_dtypes(monkeypatch):
  """The chex check of update shapes and dtypes is live: a wrong cast would be caught."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,))
  tx = lopt.transform(_random_meta_params(lopt))
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  state = tx.init(params)
  monkeypatch.setattr(learned_optimizer, "_cast_like",
                      lambda step, p: jnp.reshape(step, jnp.shape(p)))  # forgets the cast
  with pytest.raises(AssertionError, match=r"bfloat16"):
    jax.jit(tx.update)(params, state, params)


def test_meta_params_of_another_shape_are_refused():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,))
  other = optax_learned.LearnedOptimizer(hidden_sizes=(5,))
  with pytest.raises(AssertionError, match=r"shapes"):
    lopt.transform(_random_meta_params(other))


@pytest.mark.parametrize("kwargs, error", [
    ({"hidden_sizes": (0,)}, ValueError), ({"hidden_sizes": (2.5,)}, TypeError),
    ({"hidden_sizes": "32"}, TypeError), ({"momentum_decays": ()}, ValueError),
    ({"momentum_decays": (1.0,)}, ValueError), ({"second_moment_decay": "0.9"}, TypeError),
    ({"time_scales": (0.0,)}, ValueError), ({"step_mult": float("nan")}, TypeError),
    ({"epsilon": 0.0}, ValueError), ({"activation": "swish"}, ValueError),
    ({"skip_nonfinite": 1}, TypeError),
])
def test_invalid_configuration_is_refused(kwargs, error):
  with pytest.raises(error, match=next(iter(kwargs))):
    optax_learned.LearnedOptimizer(**kwargs)


def test_config_round_trips_through_dict():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=[3, 2], momentum_decays=[0.5], exp_mult=1)
  assert optax_learned.LearnedOptimizer.from_dict(lopt.to_dict()) == lopt
  with pytest.raises(ValueError, match=r"unknown optimizer config keys \['hiden_sizes'\]"):
    optax_learned.LearnedOptimizer.from_dict({"hiden_sizes": [3]})


# -- numerics --------------------------------------------------------------------------------

_EXTREMES = {
    "zero grads, zero params": (0.0, 0.0),
    "tiny spike": (1e-37, 0.0),  # normalising it would need a factor beyond float32
    "huge grads": (1e30, 1.0),
    "huge params": (1e-3, 1e30),
    "huge both": (-1e30, 1e30),
    "tiny grads": (1e-30, 0.0),
    "zero grads, huge params": (0.0, 1e30),
}


def _extreme_tree(grad_value, param_value):
  grads = {"mixed": jnp.asarray([grad_value, 0.0, -1.0], jnp.float32),
           "s": jnp.asarray(grad_value, jnp.float32),
           "sparse": jnp.zeros(4096, jnp.float32).at[7].set(grad_value)}
  params = {"mixed": jnp.asarray([param_value, 0.0, 1.0], jnp.float32),
            "s": jnp.asarray(param_value, jnp.float32),
            "sparse": jnp.zeros(4096, jnp.float32).at[3].set(param_value)}
  return grads, params


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@functools.cache
def _extreme_fns():
  """Jitted two-step unroll and its derivatives, compiled once for every extreme case."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)

  def unroll(meta_params, grads, params):
    """Two steps; the second step's features depend on meta_params through the params."""
    tx = lopt.transform(meta_params)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    updates, state = tx.update(grads, state, params)
    return updates, state, optax.apply_updates(params, updates)

  def meta_loss(meta_params, grads, params):
    updates, _, _ = unroll(meta_params, grads, params)
    return sum(jnp.sum(jnp.sin(1e3 * u)) for u in jax.tree.leaves(updates))

  return (lopt, jax.jit(unroll),
          jax.jit(jax.grad(meta_loss, argnums=(0, 1, 2))))


@pytest.mark.parametrize("case", list(_EXTREMES))
def test_extreme_inputs_give_finite_updates_state_and_meta_gradients(case):
  grads, params = _extreme_tree(*_EXTREMES[case])
  lopt, unroll, meta_grad = _extreme_fns()
  meta_params = _random_meta_params(lopt)

  updates, state, new_params = unroll(meta_params, grads, params)
  assert _all_finite(updates), updates
  assert _all_finite(state), state
  assert _all_finite(new_params)

  meta_grads, grad_grads, param_grads = meta_grad(meta_params, grads, params)
  assert _all_finite(meta_grads), meta_grads
  assert _all_finite(grad_grads), grad_grads
  assert _all_finite(param_grads), param_grads
  assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(meta_grads))


def test_exact_zero_feature_columns_have_finite_gradients():
  """Normalising all-zero columns: forward zeros, and no NaN from rsqrt/division at 0."""
  normalize = learned_optimizer.normalize_columns
  x = jnp.zeros((5, 3)).at[:, 0].set(jnp.arange(5.0))
  y, vjp = jax.vjp(jax.jit(normalize), x)
  assert _all_finite(y) and bool(jnp.all(y[:, 1:] == 0))
  assert _all_finite(vjp(jnp.ones_like(y)))
  assert _all_finite(jax.jit(jax.jacfwd(normalize))(jnp.zeros((2, 2))))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_gradients_are_skipped(bad):
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  meta_params = _random_meta_params(lopt)
  init, update = _jitted(lopt)
  params, grads = _tiny_tree(0), _tiny_tree(1)
  _, state = update(meta_params, grads, init(meta_params, params), params)  # not all zeros
  bad_grads = {**grads, "w": grads["w"].at[1, 2].set(bad)}
  updates, new_state = update(meta_params, bad_grads, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(new_state, state)  # the count too
  assert int(new_state.count) == 1

  # The skipped step contributes zeros, not NaN, to meta-gradients.
  meta_loss = lambda mp: sum(jnp.sum(u) for u in jax.tree.leaves(
      update(mp, bad_grads, state, params)[0]))
  meta_grads = jax.jit(jax.grad(meta_loss))(meta_params)
  chex.assert_trees_all_equal(meta_grads, jax.tree.map(jnp.zeros_like, meta_grads))


def test_nonfinite_gradients_propagate_when_not_skipped():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0,
                                        skip_nonfinite=False)
  meta_params = _random_meta_params(lopt)
  init, update = _jitted(lopt)
  params, grads = _tiny_tree(0), _tiny_tree(1)
  bad_grads = {**grads, "w": grads["w"].at[0, 0].set(jnp.nan)}
  updates, state = update(meta_params, bad_grads, init(meta_params, params), params)
  assert int(state.count) == 1
  assert not bool(jnp.all(jnp.isfinite(updates["w"])))
  assert _all_finite(updates["b"])  # other leaves are unaffected
  # Infinities are clipped to 1e18 like any huge gradient.
  inf_grads = {**grads, "w": grads["w"].at[0, 0].set(jnp.inf)}
  updates, state = update(meta_params, inf_grads, init(meta_params, params), params)
  assert _all_finite(updates) and _all_finite(state)


# -- hygiene ---------------------------------------------------------------------------------


def test_package_source_uses_no_pickle_eval_exec_or_dynamic_imports():
  package = pathlib.Path(optax_learned.__file__).parent
  forbidden = re.compile(r"\bpickle\b|\bcloudpickle\b|\bdill\b|\bmarshal\b|\bshelve\b|"
                         r"allow_pickle\s*=\s*True|(?<![\w.])eval\(|(?<![\w.])exec\(|"
                         r"\bimportlib\b|__import__\(|\bjoblib\b")
  sources = sorted(package.rglob("*.py"))
  assert len(sources) >= 4
  offenders = [f"{path.relative_to(package)}:{number}: {line.strip()}"
               for path in sources
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if forbidden.search(line)]
  assert not offenders, offenders
