"""Tests of the learned optimizer transformation: reference maths, pytrees, errors, numerics."""

import dataclasses
import functools
import json
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
# The reference's own copies of the documented constants (checked against the module below).
_SAMPLE_SIZE = 4096
_TENSOR_FEATURES = ("log_fan_in", "log_fan_out", "is_vector", "log_relative_scale", "log_snr")


def _np_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _sampled_rows(num_rows, width):
  """The documented pseudo-random rows of a ``[num_rows, width]`` tensor, in order."""
  return np.sort(np.random.default_rng(num_rows).choice(num_rows, _SAMPLE_SIZE // width,
                                                        replace=False))


def _sample(x):
  """At most 4096 elements: all of a small tensor; of a larger one with rows (its last
  dimension) of 2 to 2048 elements, ``4096 // width`` whole rows (:func:`_sampled_rows`);
  else every ``n // 4096``-th element of the flattened array."""
  flat = x.reshape(-1)
  if flat.size <= _SAMPLE_SIZE:
    return flat
  width = x.shape[-1] if x.ndim >= 2 else 1
  if 1 < width <= _SAMPLE_SIZE // 2:
    rows = flat.reshape(-1, width)
    return rows[_sampled_rows(rows.shape[0], width)].reshape(-1)
  return flat[::flat.size // _SAMPLE_SIZE][:_SAMPLE_SIZE]


def reference_step(lopt, meta_params, grads, params, state, learning_rate=1.0):
  """One step of the hierarchical learned optimizer, written out in float64 numpy.

  For each tensor: scale-free features (fan-in, fan-out, vector flag, parameter scale
  against ``1 / sqrt(fan_in)``, gradient signal-to-noise ratio; both on samples of the
  state the step receives) and
  time features feed the per-tensor MLP; its first output is a bounded log-step correction
  of the fan-in scaled base step, its second the logit of the gradient mix ``q`` (offset by
  the initial mix). Each element then takes Adam's bias-corrected step with that step size
  and mix, and kernels (two or more dimensions) also decay by ``weight_decay`` times the
  multiplier. ``state`` is ``(count, mu, nu)`` with dict trees; returns ``(updates, state)``.
  """
  count, mu, nu = state
  w = _np_tree(meta_params)
  act = _ACTIVATIONS[lopt.activation]
  b1, b2, bound = lopt.beta1, lopt.beta2, lopt.max_log_correction
  mu_correction = 1.0 / (1.0 - b1 ** (count + 1))
  nu_correction = 1.0 / (1.0 - b2 ** (count + 1))
  time = np.tanh(count / np.asarray(lopt.time_scales) - 1.0)
  mix_logit = math.log(lopt.initial_gradient_mix / (1.0 - lopt.initial_gradient_mix))
  multiplier = learning_rate(count) if callable(learning_rate) else learning_rate
  num_layers = len(lopt.hidden_sizes) + 1
  updates, new_mu, new_nu = {}, {}, {}
  for key in grads:
    p = np.asarray(params[key], np.float64)
    m0, v0 = np.asarray(mu[key], np.float64), np.asarray(nu[key], np.float64)
    raw = np.asarray(grads[key], np.float64)
    shape = p.shape
    ok = np.isfinite(raw) if lopt.skip_nonfinite else np.ones(shape, bool)
    g = np.where(ok, np.clip(raw, -1e18, 1e18), 0.0)
    with np.errstate(invalid="ignore"):
      m, v = b1 * m0 + (1 - b1) * g, b2 * v0 + (1 - b2) * g ** 2
    # A skipped element keeps its accumulators.
    new_mu[key], new_nu[key] = np.where(ok, m, m0), np.where(ok, v, v0)
    fan_in = max(math.prod(shape[:-1]), 1) if len(shape) >= 2 else 1
    fan_out = shape[-1] if len(shape) >= 2 else 1
    features = [math.log(fan_in) / 4.0, math.log(fan_out) / 4.0, float(len(shape) < 2)]
    if p.size:
      # The features read the accumulators as the step receives them (before this
      # gradient), bias-corrected for the updates they have seen (at least 1: at count 0
      # they are zero), non-finite entries (not skipped when skip_nonfinite is off) as zeros.
      seen = max(count, 1)
      ps, ms, vs = (_sample(x) for x in (p, m0, v0))
      ms, vs = (np.where(np.isfinite(x), x, 0.0) for x in (ms, vs))
      scale = math.log(np.mean(ps ** 2) * fan_in + 1e-30) / 2.0
      snr = math.log((np.mean((ms / (1.0 - b1 ** seen)) ** 2) + 1e-30)
                     / (np.mean(vs / (1.0 - b2 ** seen)) + 1e-30))
      features += [np.clip(scale, -10.0, 10.0) / 2.0, np.clip(snr, -20.0, 0.0) / 4.0]
    else:
      features += [0.0, 0.0]
    h = np.concatenate([features, time])
    for i in range(num_layers):
      h = h @ w[f"layer_{i}"]["w"] + w[f"layer_{i}"]["b"]
      if i < num_layers - 1:
        h = act(h)
    correction = bound * np.tanh(h[0] / bound)
    log_base = (w["log_base_step"][0] - math.log(fan_in) if len(shape) >= 2
                else w["log_base_step"][1])
    step_size = math.exp(log_base + correction) * multiplier
    mix = 1.0 / (1.0 + math.exp(-(h[1] + mix_logit)))
    with np.errstate(invalid="ignore"):
      update = -step_size * (((1 - mix) * m * mu_correction + mix * g)
                             / (np.sqrt(v * nu_correction) + lopt.epsilon))
    if len(shape) >= 2:  # decoupled weight decay of kernels, scaled like the steps
      update = update - lopt.weight_decay * multiplier * p
    updates[key] = np.where(ok, update, 0.0)
  return updates, (count + 1, new_mu, new_nu)


def test_reference_constants_are_the_documented_ones():
  assert learned_optimizer.FEATURE_SAMPLE_SIZE == _SAMPLE_SIZE
  assert learned_optimizer.TENSOR_FEATURES == _TENSOR_FEATURES
  assert learned_optimizer.OUTPUTS == ("log_step_correction", "gradient_mix")
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(3, 2), time_scales=(1.0, 2.0))
  assert lopt.num_features == len(_TENSOR_FEATURES) + 2
  shapes = jax.tree.map(lambda s: s.shape, lopt.meta_params_shapes())
  assert shapes == {"layer_0": {"w": (7, 3), "b": (3,)}, "layer_1": {"w": (3, 2), "b": (2,)},
                    "layer_2": {"w": (2, 2), "b": (2,)}, "log_base_step": (2,)}


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


def _reference_tree(seed, scale=1.0):
  """Vectors, a scalar, a matrix, a 3-d kernel and a tensor sampled for its features.

  ``big`` has 3 * 4100 elements in rows longer than half the sample: its features are read
  from every third element, and of those only the first 4096 (flat indices 0, 3, ...,
  12285). ``rows`` is 2100 rows of 6: its features are read from 682 of its rows (4092
  elements, :func:`_sampled_rows`).
  """
  rng = np.random.default_rng(seed)
  tree = {"k": rng.normal(size=(2, 2, 3)), "big": 0.1 * rng.normal(size=(3, 4100)),
          "rows": 0.1 * rng.normal(size=(2100, 6)), "empty": np.zeros((0, 3))}
  return {**_tiny_tree(seed, scale),
          **{key: jnp.asarray(scale * x, jnp.float32) for key, x in tree.items()}}


def _assert_close(actual, expected, rtol=2e-4):
  for key in expected:
    a, e = np.asarray(actual[key], np.float64), np.asarray(expected[key])
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.max(np.abs(e), initial=0.0)
                               + 1e-30, err_msg=key)


def _state_as_np(state):
  return int(state.count), _np_tree(state.mu), _np_tree(state.nu)


@pytest.mark.parametrize("activation, hidden_sizes, bound, weight_decay", [
    ("relu", (6,), 3.0, 0.0), ("tanh", (5, 4), 3.0, 0.0), ("gelu", (3,), 3.0, 0.0),
    ("relu", (), 0.5, 0.0), ("relu", (6,), 3.0, 0.3),
])
def test_matches_numpy_reference_for_two_steps(activation, hidden_sizes, bound, weight_decay):
  lopt = optax_learned.LearnedOptimizer(
      hidden_sizes=hidden_sizes, activation=activation, beta1=0.8, beta2=0.99,
      time_scales=(1.0, 10.0, 100.0), max_log_correction=bound, initial_gradient_mix=0.2,
      weight_decay=weight_decay)
  meta_params = _random_meta_params(lopt)
  init, update = _jitted(lopt)
  params, grads_1, grads_2 = _reference_tree(0), _reference_tree(1), _reference_tree(2, 1e-3)

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
  _assert_close(state.mu, ref_state[1], rtol=1e-6)
  _assert_close(state.nu, ref_state[2], rtol=1e-6)
  # The network matters: the steps are not those of its untrained (near-Adam) outputs.
  untrained, _ = reference_step(lopt, lopt.init(jax.random.key(0)), grads_1, params,
                                _state_as_np(init(meta_params, params)))
  assert not np.allclose(untrained["w"], expected_1["w"], rtol=1e-2)


def test_matches_numpy_reference_from_a_late_state():
  """Time features at step 37 and non-zero accumulators enter as the reference says."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(8,), time_scales=(10.0, 100.0))
  meta_params = _random_meta_params(lopt, seed=3)
  params, grads = _reference_tree(4), _reference_tree(5)
  rng = np.random.default_rng(6)
  state = optax_learned.LearnedOptimizerState(
      count=jnp.asarray(37, jnp.int32),
      mu=jax.tree.map(lambda p: jnp.asarray(0.3 * rng.normal(size=p.shape), jnp.float32),
                      params),
      nu=jax.tree.map(lambda p: jnp.asarray(rng.uniform(size=p.shape), jnp.float32), params))
  updates, new_state = _jitted(lopt)[1](meta_params, grads, state, params)
  expected, ref_state = reference_step(lopt, meta_params, grads, params, _state_as_np(state))
  _assert_close(updates, expected)
  assert int(new_state.count) == 38
  _assert_close(new_state.mu, ref_state[1], rtol=1e-6)
  _assert_close(new_state.nu, ref_state[2], rtol=1e-6)


@pytest.mark.parametrize("leaf,shape,unsampled,sampled", [
    ("big", (3, 4100), (1, 3 * 4096), 3),  # off the stride; on it, past the first 4096
    ("rows", (2100, 6),  # in two unsampled rows, and in a sampled one
     tuple(int(r) * 6 + 2 for r in np.setdiff1d(np.arange(2100), _sampled_rows(2100, 6))[:2]),
     int(_sampled_rows(2100, 6)[1]) * 6 + 1),
])
def test_features_read_only_the_sample(leaf, shape, unsampled, sampled):
  """Elements outside the sample change no step size: only their own update changes."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(8,), time_scales=(10.0, 100.0))
  meta_params = _random_meta_params(lopt, seed=3)
  init, update = _jitted(lopt)
  params, grads = _reference_tree(4), _reference_tree(5)
  step = lambda g, p: update(meta_params, g, init(meta_params, p), p)[0]
  base = step(grads, params)
  set_big = lambda tree, index, value: {
      **tree, leaf: tree[leaf].reshape(-1).at[index].set(value).reshape(shape)}

  for index in unsampled:
    chex.assert_trees_all_equal(step(grads, set_big(params, index, 100.0)), base)
    # The first step is sign descent: a gradient of the opposite sign moves this element.
    flipped = -100.0 * np.sign(np.asarray(grads[leaf]).reshape(-1)[index])
    moved = step(set_big(grads, index, flipped), params)
    changed = np.flatnonzero(np.asarray(moved[leaf] != base[leaf]).reshape(-1))
    assert changed.tolist() == [index]
    chex.assert_trees_all_equal({k: v for k, v in moved.items() if k != leaf},
                                {k: v for k, v in base.items() if k != leaf})
  moved = step(grads, set_big(params, sampled, 100.0))  # the parameter scale feature moves
  assert not np.allclose(moved[leaf], base[leaf], rtol=1e-3)
  chex.assert_trees_all_equal(moved["w"], base["w"])  # other tensors keep their steps


def test_step_sizes_read_the_incoming_state():
  """This step's gradient of one element moves only that element's update: the step sizes
  come from the accumulators the step receives, not from the ones it leaves."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(8,), time_scales=(10.0, 100.0))
  meta_params = _random_meta_params(lopt, seed=3)
  init, update = _jitted(lopt)
  params, grads = _reference_tree(4), _reference_tree(5)
  _, state = update(meta_params, grads, init(meta_params, params), params)
  base, next_state = update(meta_params, grads, state, params)
  changed_grads = {**grads, "w": grads["w"].at[0, 0].multiply(30.0)}
  moved, changed_state = update(meta_params, changed_grads, state, params)
  changed = np.flatnonzero(np.asarray(moved["w"] != base["w"]).reshape(-1))
  assert changed.tolist() == [0]
  chex.assert_trees_all_equal({k: v for k, v in moved.items() if k != "w"},
                              {k: v for k, v in base.items() if k != "w"})
  # The next step reads the accumulators this one left: every element of ``w`` moves.
  later = update(meta_params, grads, next_state, params)[0]["w"]
  changed_later = update(meta_params, grads, changed_state, params)[0]["w"]
  assert np.all(np.asarray(later != changed_later))


def test_descent_weights_are_a_width_scaled_qh_adam(descent_optimizer):
  """Zero network weights: the first step is sign descent of fan-in scaled size, and later
  steps are QH-Adam (Adam with a fixed mix of the raw gradient) with those step sizes."""
  lopt, meta_params = descent_optimizer
  init, update = _jitted(lopt)
  rng = np.random.default_rng(0)
  shapes = {"b": (3,), "s": (), "w": (2, 3), "k": (2, 2, 3), "big": (3, 4100),
            "empty": (0, 3)}
  fan_in = {"b": 1, "s": 1, "w": 2, "k": 4, "big": 3, "empty": 1}
  grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
           for _ in range(4)]
  params = {k: jnp.ones(s) for k, s in shapes.items()}
  state = init(meta_params, params)
  q, (b1, b2, eps) = lopt.initial_gradient_mix, (lopt.beta1, lopt.beta2, lopt.epsilon)
  m = {k: np.zeros(s) for k, s in shapes.items()}
  v = {k: np.zeros(s) for k, s in shapes.items()}
  for t, g in enumerate(grads, start=1):
    updates, state = update(meta_params, g, state, params)
    for key, shape in shapes.items():
      size = lopt.matrix_step / fan_in[key] if len(shape) >= 2 else lopt.vector_step
      g_np = np.asarray(g[key], np.float64)
      m[key] = b1 * m[key] + (1 - b1) * g_np
      v[key] = b2 * v[key] + (1 - b2) * g_np ** 2
      expected = -size * (((1 - q) * m[key] / (1 - b1 ** t) + q * g_np)
                          / (np.sqrt(v[key] / (1 - b2 ** t)) + eps))
      # (atol: the mix of a momentum and a gradient of opposite signs cancels digits.)
      np.testing.assert_allclose(updates[key], expected, rtol=2e-4, atol=1e-5 * size,
                                 err_msg=key)
      if t == 1:  # |g| / (|g| + eps): within 1e-4 of 1 unless |g| < 1e-4
        np.testing.assert_allclose(updates[key], -size * np.sign(g_np), rtol=1e-4,
                                   atol=1e-3 * size, err_msg=key)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_networks_step_correction_is_bounded(descent_optimizer, sign):
  """However large the network's output, a step stays within exp(±max_log_correction) of
  the fan-in scaled base step."""
  lopt, meta_params = descent_optimizer
  last = f"layer_{len(lopt.hidden_sizes)}"
  meta_params = {**meta_params, last: {**meta_params[last],
                                       "b": jnp.asarray([sign * 1e4, 0.0], jnp.float32)}}
  init, update = _jitted(lopt)
  grads = {"b": jnp.asarray([0.5, -2.0, 3.0]), "w": jnp.asarray([[1.0, -1.0, 2.0]] * 4)}
  params = jax.tree.map(jnp.ones_like, grads)
  updates, _ = update(meta_params, grads, init(meta_params, params), params)
  factor = math.exp(sign * lopt.max_log_correction)
  np.testing.assert_allclose(updates["b"], -lopt.vector_step * factor * np.sign(grads["b"]),
                             rtol=1e-4)
  np.testing.assert_allclose(updates["w"], -lopt.matrix_step / 4 * factor * np.sign(grads["w"]),
                             rtol=1e-4)


# -- the learning-rate multiplier ------------------------------------------------------------


@functools.cache
def _jitted_with_rate(lopt):
  """``update`` of ``lopt`` jitted with the weights and a scalar learning rate as arguments."""
  return jax.jit(lambda meta_params, learning_rate, grads, state, params: lopt.transform(
      meta_params, learning_rate=learning_rate).update(grads, state, params))


def test_learning_rate_scales_every_step_exactly():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  meta_params = _random_meta_params(lopt)
  init, update = _jitted(lopt)
  update_at = _jitted_with_rate(lopt)
  params, grads = _reference_tree(0), _reference_tree(1)
  state = init(meta_params, params)
  full, full_state = update_at(meta_params, 1.0, grads, state, params)
  half, half_state = update_at(meta_params, 0.5, grads, state, params)
  chex.assert_trees_all_equal(full, update(meta_params, grads, state, params)[0])
  chex.assert_trees_all_equal(half, jax.tree.map(lambda u: 0.5 * u, full))
  chex.assert_trees_all_equal(half_state, full_state)  # the accumulators do not see it
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(full))
  expected, _ = reference_step(lopt, meta_params, grads, params, _state_as_np(state), 0.5)
  _assert_close(half, expected)


def test_learning_rate_schedule_is_a_function_of_the_count():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  meta_params = _random_meta_params(lopt)
  init, update = _jitted(lopt)
  counts = []

  def schedule(count):
    counts.append(count)
    return 0.25 ** count  # 1 for the first update, 1/4 for the second

  tx = lopt.transform(meta_params, learning_rate=schedule)
  step = jax.jit(tx.update)
  params, grads_1, grads_2 = _tiny_tree(0), _tiny_tree(1), _tiny_tree(2)
  updates_1, state = step(grads_1, init(meta_params, params), params)
  updates_2, state = step(grads_2, state, params)
  assert counts and all(c.dtype == jnp.int32 and c.shape == () for c in counts)
  plain_1, plain_state = update(meta_params, grads_1, init(meta_params, params), params)
  plain_2, _ = update(meta_params, grads_2, plain_state, params)
  chex.assert_trees_all_equal(updates_1, plain_1)
  chex.assert_trees_all_close(updates_2, jax.tree.map(lambda u: 0.25 * u, plain_2),
                              rtol=1e-6)
  assert int(state.count) == 2


def test_learning_rate_works_under_inject_hyperparams():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  meta_params = _random_meta_params(lopt)
  tx = optax.inject_hyperparams(functools.partial(lopt.transform, meta_params))(
      learning_rate=0.5)
  params, grads = _tiny_tree(0), _tiny_tree(1)
  state = tx.init(params)
  step = jax.jit(tx.update)
  half, _ = step(grads, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(1.0)
  full, new_state = step(grads, state, params)
  chex.assert_trees_all_equal(half, jax.tree.map(lambda u: 0.5 * u, full))
  assert int(new_state.inner_state.count) == 1


# -- the training length -----------------------------------------------------------------------


@pytest.mark.parametrize("learning_rate", [1.0, 0.5, optax.linear_schedule(1.0, 0.5, 10)])
def test_num_steps_multiplies_every_step_by_the_cosine_decay(learning_rate):
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  meta_params = _random_meta_params(lopt)
  params, grads = _tiny_tree(0), _tiny_tree(1)
  plain = jax.jit(lopt.transform(meta_params).update)
  annealed = jax.jit(lopt.transform(meta_params, learning_rate, num_steps=10).update)
  rate = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
  state = lopt.transform(meta_params).init(params)
  for count in (0, 3, 5, 9, 10, 25):
    at = state._replace(count=jnp.asarray(count, jnp.int32))
    full, full_state = plain(grads, at, params)
    got, got_state = annealed(grads, at, params)
    factor = float(rate(count) * optax.cosine_decay_schedule(1.0, 10)(count))
    chex.assert_trees_all_close(got, jax.tree.map(lambda u, f=factor: f * u, full),
                                rtol=1e-5, atol=1e-12)
    chex.assert_trees_all_equal(got_state, full_state)  # the accumulators do not see it
  # 1 at the first update, 0 from update num_steps + 1 on.
  first = annealed(grads, state, params)[0]
  chex.assert_trees_all_close(first, jax.tree.map(lambda u: float(rate(0)) * u,
                                                  plain(grads, state, params)[0]), rtol=1e-6)
  late = annealed(grads, state._replace(count=jnp.asarray(10, jnp.int32)), params)[0]
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(late))


def test_num_steps_works_under_inject_hyperparams_and_from_load():
  lopt, meta_params = optax_learned.load_weights("cifar")
  params, grads = _tiny_tree(0), _tiny_tree(1)
  tx = optax.inject_hyperparams(functools.partial(lopt.transform, meta_params))(num_steps=4)
  state = tx.init(params)
  expected, _ = jax.jit(optax_learned.load("cifar", num_steps=4).update)(
      grads, tx.init(params).inner_state._replace(count=jnp.asarray(2, jnp.int32)), params)
  state = state._replace(inner_state=state.inner_state._replace(count=jnp.asarray(2, jnp.int32)))
  got, _ = jax.jit(tx.update)(grads, state, params)
  chex.assert_trees_all_close(got, expected, rtol=1e-6)
  undecayed = dataclasses.replace(lopt, anneal_steps=None).transform(meta_params)
  half, _ = jax.jit(undecayed.update)(grads, state.inner_state, params)
  chex.assert_trees_all_close(got, jax.tree.map(lambda u: 0.5 * u, half), rtol=1e-5)


def test_anneal_steps_decays_every_step_when_num_steps_is_not_given():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  annealing = dataclasses.replace(lopt, anneal_steps=10)
  meta_params = _random_meta_params(lopt)
  params, grads = _tiny_tree(0), _tiny_tree(1)
  plain = jax.jit(lopt.transform(meta_params).update)
  annealed = jax.jit(annealing.transform(meta_params, learning_rate=0.5).update)
  told = jax.jit(annealing.transform(meta_params, num_steps=20).update)
  cosine = jax.jit(lopt.transform(meta_params, num_steps=20).update)
  state = lopt.transform(meta_params).init(params)
  for count in (0, 5, 10, 30):
    at = state._replace(count=jnp.asarray(count, jnp.int32))
    full, full_state = plain(grads, at, params)
    got, got_state = annealed(grads, at, params)
    factor = 0.5 / (1.0 + count / 10)
    chex.assert_trees_all_close(got, jax.tree.map(lambda u, f=factor: f * u, full),
                                rtol=1e-5, atol=1e-12)
    chex.assert_trees_all_equal(got_state, full_state)
    # Told the training length, the cosine replaces the inverse-time decay.
    chex.assert_trees_all_equal(told(grads, at, params)[0], cosine(grads, at, params)[0])


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), (True, TypeError),
    ("100", TypeError)])
def test_invalid_anneal_steps_is_refused_naming_it(value, error):
  with pytest.raises(error, match="anneal_steps must be a positive number"):
    optax_learned.LearnedOptimizer(anneal_steps=value)


def test_anneal_steps_round_trips_through_to_dict_and_defaults_to_none():
  config = optax_learned.LearnedOptimizer(anneal_steps=500).to_dict()
  assert config["anneal_steps"] == 500.0
  assert optax_learned.LearnedOptimizer.from_dict(config).anneal_steps == 500.0
  assert optax_learned.LearnedOptimizer().anneal_steps is None


def test_weight_decay_is_decoupled_on_kernels_and_scaled_like_the_steps():
  """Kernels' updates subtract ``weight_decay * lr(t) * p``; vectors and scalars do not
  decay, the accumulators do not see it, and a skipped (non-finite) element takes no step."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0,
                                        anneal_steps=10)
  decaying = dataclasses.replace(lopt, weight_decay=0.1)
  meta_params = _random_meta_params(lopt)
  params, grads = _reference_tree(0), _reference_tree(1)
  grads["w"] = grads["w"].at[0, 1].set(jnp.nan)
  state = lopt.transform(meta_params).init(params)
  plain_at, decaying_at = _jitted_with_rate(lopt), _jitted_with_rate(decaying)
  for count, rate in ((0, 1.0), (5, 0.5), (30, 2.0)):
    at = state._replace(count=jnp.asarray(count, jnp.int32))
    plain, plain_state = plain_at(meta_params, rate, grads, at, params)
    got, got_state = decaying_at(meta_params, rate, grads, at, params)
    multiplier = rate / (1.0 + count / 10)
    for key in params:
      expected = plain[key]
      if params[key].ndim >= 2:
        expected = expected - 0.1 * multiplier * params[key]
      if key == "w":
        expected = expected.at[0, 1].set(0.0)
        assert float(got[key][0, 1]) == 0.0
      np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)
    for key in ("b", "s"):
      chex.assert_trees_all_equal(got[key], plain[key])
    chex.assert_trees_all_equal(got_state, plain_state)
  # Told the training length, the decay follows the cosine to zero with the steps.
  late = jax.jit(decaying.transform(meta_params, num_steps=10).update)(
      grads, state._replace(count=jnp.asarray(10, jnp.int32)), params)[0]
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(late))


@pytest.mark.parametrize("num_steps, error", [
    (0, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError), ("10", TypeError),
    (jnp.asarray(3.0), TypeError)])
def test_invalid_num_steps_is_refused_naming_it(num_steps, error):
  with pytest.raises(error, match="num_steps must be a positive integer"):
    optax_learned.load("cifar", num_steps=num_steps)


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
  assert jax.tree.structure(state.mu) == jax.tree.structure(params)
  for m, v, p in zip(jax.tree.leaves(state.mu), jax.tree.leaves(state.nu),
                     jax.tree.leaves(params), strict=True):
    assert m.shape == v.shape == jnp.shape(p) and m.dtype == v.dtype == jnp.float32
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
    updates, state = tx.update(grads, tx.init(params), params)
    reference, reference_state = tx.update(as_type(grads, jnp.float32), tx.init(params32),
                                           as_type(params, jnp.float32))
    for key in params:
      assert updates[key].dtype == dtype
      np.testing.assert_array_equal(updates[key], reference[key].astype(dtype))
    chex.assert_trees_all_equal(state, reference_state)  # float32 accumulators
    # Updates take the dtype of the params, whatever the dtype of the gradients.
    mixed, _ = tx.update(grads32, tx.init(params), params)
    assert all(mixed[key].dtype == dtype for key in params)


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


def test_swapped_state_and_params_raise_invalid_tree_naming_the_order():
  _, tx = _lopt_tx()
  params, grads = _tiny_tree(0), _tiny_tree(1)
  state = tx.init(params)
  order = re.escape("tx.update(grads, opt_state, params)")
  with pytest.raises(optax_learned.InvalidTreeError,
                     match=r"params is an optimizer state \(LearnedOptimizerState\).*" + order):
    tx.update(grads, params, state)
  with pytest.raises(optax_learned.InvalidTreeError, match=order):
    jax.jit(tx.update)(grads, params, state)
  with pytest.raises(optax_learned.InvalidTreeError, match=order):  # any Optax state
    tx.update(grads, state, optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                                   mu=params, nu=params))


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


def test_shape_mismatch_raises_invalid_tree_naming_the_leaf_and_both_shapes():
  _, tx = _lopt_tx()
  params = _tiny_tree(0)
  wrong = {**params, "w": jnp.ones((3, 2))}
  with pytest.raises(optax_learned.InvalidTreeError, match=re.escape(
      "updates['w'] has shape (3, 2), but params['w'] has shape (2, 3)")):
    tx.update(wrong, tx.init(params), params)
  with pytest.raises(optax_learned.InvalidTreeError, match=re.escape(
      "optimizer state mu['w'] has shape (3, 2), but params['w'] has shape (2, 3)")):
    tx.update(params, tx.init(wrong), params)
  with pytest.raises(optax_learned.InvalidTreeError, match=re.escape(
      "optimizer state mu['w'] has shape (2, 3), but params['w'] has shape (3, 2)")):
    tx.update(wrong, tx.init(params), wrong)
  with pytest.raises(TypeError):  # also a built-in TypeError
    jax.jit(tx.update)(wrong, tx.init(params), params)


def test_meta_params_of_another_shape_are_refused():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,))
  other = optax_learned.LearnedOptimizer(hidden_sizes=(5,))
  with pytest.raises(optax_learned.InvalidTreeError, match=re.escape(
      "meta_params['layer_0']['b'] has shape (5,), but the optimizer's "
      "weights['layer_0']['b'] has shape (4,)")):
    lopt.transform(_random_meta_params(other))
  incomplete = {k: v for k, v in _random_meta_params(lopt).items() if k != "log_base_step"}
  with pytest.raises(optax_learned.InvalidTreeError, match=r"different tree structure"):
    lopt.transform(incomplete)


@pytest.mark.parametrize("kwargs, error", [
    ({"hidden_sizes": (0,)}, ValueError), ({"hidden_sizes": (2.5,)}, TypeError),
    ({"hidden_sizes": "32"}, TypeError), ({"beta1": 1.0}, ValueError),
    ({"beta1": True}, TypeError), ({"beta2": -0.1}, ValueError), ({"beta2": "0.9"}, TypeError),
    ({"time_scales": (0.0,)}, ValueError), ({"time_scales": 10.0}, TypeError),
    ({"matrix_step": float("nan")}, TypeError), ({"matrix_step": 0.0}, ValueError),
    ({"vector_step": -1e-3}, ValueError), ({"max_log_correction": 0.0}, ValueError),
    ({"initial_gradient_mix": 0.0}, ValueError), ({"initial_gradient_mix": 1.0}, ValueError),
    ({"output_init_scale": float("inf")}, TypeError),
    ({"epsilon": 0.0}, ValueError), ({"activation": "swish"}, ValueError),
    ({"skip_nonfinite": 1}, TypeError), ({"weight_decay": -1e-4}, ValueError),
    ({"weight_decay": "1e-4"}, TypeError), ({"weight_decay": float("nan")}, TypeError),
])
def test_invalid_configuration_is_refused(kwargs, error):
  with pytest.raises(error, match=next(iter(kwargs))):
    optax_learned.LearnedOptimizer(**kwargs)


def test_config_round_trips_through_dict():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=[3, 2], time_scales=[5, 50], matrix_step=1,
                                        beta1=0.5, skip_nonfinite=False)
  assert lopt.hidden_sizes == (3, 2) and lopt.time_scales == (5.0, 50.0)
  assert isinstance(lopt.matrix_step, float)
  assert optax_learned.LearnedOptimizer.from_dict(lopt.to_dict()) == lopt
  assert optax_learned.LearnedOptimizer.from_dict(
      json.loads(json.dumps(lopt.to_dict()))) == lopt
  with pytest.raises(ValueError, match=r"unknown optimizer config keys \['hiden_sizes'\]"):
    optax_learned.LearnedOptimizer.from_dict({"hiden_sizes": [3]})
  with pytest.raises(ValueError, match=r"unknown optimizer config keys \['step_mult'\]"):
    optax_learned.LearnedOptimizer.from_dict({"step_mult": 0.1})  # of the old design


# -- numerics --------------------------------------------------------------------------------

_EXTREMES = {
    "zero grads, zero params": (0.0, 0.0),
    "tiny spike": (1e-37, 0.0),  # its square underflows float32
    "huge grads": (1e30, 1.0),
    "huge params": (1e-3, 1e30),
    "huge both": (-1e30, 1e30),
    "tiny grads": (1e-30, 0.0),
    "zero grads, huge params": (0.0, 1e30),
}


def _extreme_tree(grad_value, param_value):
  grads = {"mixed": jnp.asarray([grad_value, 0.0, -1.0], jnp.float32),
           "kernel": jnp.asarray([[grad_value, 0.0], [0.0, grad_value]], jnp.float32),
           "s": jnp.asarray(grad_value, jnp.float32),
           "sparse": jnp.zeros((2, 4100), jnp.float32).at[0, 7].set(grad_value)}
  params = {"mixed": jnp.asarray([param_value, 0.0, 1.0], jnp.float32),
            "kernel": jnp.asarray([[param_value, 0.0], [1.0, 0.0]], jnp.float32),
            "s": jnp.asarray(param_value, jnp.float32),
            "sparse": jnp.zeros((2, 4100), jnp.float32).at[0, 4].set(param_value)}
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


def test_pathwise_meta_gradients_are_finite_when_a_gradient_starts_at_zero():
  """Backpropagating through training (the pathwise estimator) stays finite when an
  element's gradient is exactly zero for its first steps (an input feature absent from the
  first batches, a dead unit, an unused embedding row), so that its ``nu`` is still 0."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,))
  loss = lambda p, x: jnp.sum((x @ p["w"] - 1.0) ** 2)

  @jax.jit
  @jax.grad
  def meta_grad(meta_params, batches):
    tx = lopt.transform(meta_params)
    params = {"w": jnp.asarray([0.3, -0.2])}
    state = tx.init(params)
    for x in batches:
      updates, state = tx.update(jax.grad(loss)(params, x), state, params)
      params = optax.apply_updates(params, updates)
    return loss(params, batches[-1])

  batches = jnp.asarray([[[0.0, 1.0]], [[0.0, 1.0]], [[1.0, 1.0]], [[1.0, -1.0]]])
  meta_grads = meta_grad(_random_meta_params(lopt), batches)
  assert _all_finite(meta_grads), meta_grads
  assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(meta_grads))


@functools.cache
def _skip_fns(lopt):
  """The update of ``lopt`` and the vjp of its updates w.r.t. the weights, jitted once."""
  _, update = _jitted(lopt)

  def meta_vjp(meta_params, grads, state, params, cotangent):
    fn = lambda mp: update(mp, grads, state, params)[0]
    return jax.vjp(fn, meta_params)[1](cotangent)[0]

  return update, jax.jit(meta_vjp)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_gradients_are_skipped_element_by_element(bad):
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  meta_params = _random_meta_params(lopt)
  init, _ = _jitted(lopt)
  update, meta_vjp = _skip_fns(lopt)
  params, grads = _tiny_tree(0), _tiny_tree(1)
  _, state = update(meta_params, grads, init(meta_params, params), params)  # not all zeros
  bad_grads = {**grads, "w": grads["w"].at[1, 2].set(bad)}
  updates, new_state = update(meta_params, bad_grads, state, params)
  assert int(new_state.count) == 2  # the count advances

  # The element gets a zero update and keeps its accumulators...
  assert float(updates["w"][1, 2]) == 0.0
  assert float(new_state.mu["w"][1, 2]) == float(state.mu["w"][1, 2])
  assert float(new_state.nu["w"][1, 2]) == float(state.nu["w"][1, 2])
  # ...and every other element is updated (the features read the kept accumulators), in
  # agreement with the reference.
  assert int(jnp.sum(updates["w"] != 0)) == 5 and _all_finite((updates, new_state))
  expected, ref_state = reference_step(lopt, meta_params, bad_grads, params,
                                       _state_as_np(state))
  _assert_close(updates, expected)
  _assert_close(new_state.mu, ref_state[1], rtol=1e-6)
  _assert_close(new_state.nu, ref_state[2], rtol=1e-6)

  # The skipped element contributes zeros, not NaN, to meta-gradients; the others count.
  only_skipped = jax.tree.map(jnp.zeros_like, updates)
  only_skipped["w"] = only_skipped["w"].at[1, 2].set(1.0)
  skipped_grads = meta_vjp(meta_params, bad_grads, state, params, only_skipped)
  chex.assert_trees_all_equal(skipped_grads, jax.tree.map(jnp.zeros_like, skipped_grads))
  all_grads = meta_vjp(meta_params, bad_grads, state, params,
                       jax.tree.map(jnp.ones_like, updates))
  assert _all_finite(all_grads) and any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(all_grads))


def test_a_step_of_only_nonfinite_gradients_changes_nothing_but_the_count():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0)
  meta_params = _random_meta_params(lopt)
  init, _ = _jitted(lopt)
  update, _ = _skip_fns(lopt)
  params, grads = _tiny_tree(0), _tiny_tree(1)
  _, state = update(meta_params, grads, init(meta_params, params), params)
  nan_grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
  updates, new_state = update(meta_params, nan_grads, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal((new_state.mu, new_state.nu), (state.mu, state.nu))
  assert int(new_state.count) == int(state.count) + 1


def test_nonfinite_gradients_propagate_when_not_skipped():
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0,
                                        skip_nonfinite=False)
  meta_params = _random_meta_params(lopt)
  init, update = _jitted(lopt)
  params, grads = _tiny_tree(0), _tiny_tree(1)
  bad_grads = {**grads, "w": grads["w"].at[0, 0].set(jnp.nan)}
  updates, state = update(meta_params, bad_grads, init(meta_params, params), params)
  assert int(state.count) == 1
  assert bool(jnp.isnan(updates["w"][0, 0])) and bool(jnp.isnan(state.mu["w"][0, 0]))
  assert bool(jnp.isnan(state.nu["w"][0, 0]))
  # The element's own arithmetic carries the NaN; the tensor's step size stays finite.
  assert _all_finite(updates["w"].at[0, 0].set(0.0)) and _all_finite(updates["b"])
  # Infinities are clipped to 1e18 like any huge gradient.
  inf_grads = {**grads, "w": grads["w"].at[0, 0].set(jnp.inf)}
  updates, state = update(meta_params, inf_grads, init(meta_params, params), params)
  assert _all_finite(updates) and _all_finite(state)
  expected, _ = reference_step(lopt, meta_params, inf_grads, params,
                               _state_as_np(init(meta_params, params)))
  _assert_close(updates, expected)


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
