"""The learned optimizer follows optax conventions, checked as optax checks its own optimizers.

A port of optax's common optimizer checks (convergence on a parabola and on Rosenbrock's
function within 20,000 steps, ``tree_map_params``, ``inject_hyperparams``, ``jit`` without
recompiling) run for every bundled optimizer, plus the state layout: params-shaped
accumulators that shard like the parameters, and at most 3 float32 numbers per parameter.
"""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_learned

BUNDLED = sorted(optax_learned.available())


def _parabola():
  initial = jnp.array([-1.0, 10.0, 1.0])
  final = jnp.array([1.0, -1.0, 1.0])
  return initial, final, lambda p: jnp.sum(jnp.square(p - final))


def _rosenbrock():
  a, b = 1.0, 100.0
  initial = jnp.array([0.0, 0.0])
  final = jnp.array([a, a * a])
  return initial, final, lambda p: jnp.square(a - p[0]) + b * jnp.square(p[1] - p[0] ** 2)


def _minimise(tx, objective, initial, steps):
  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(objective)(params), state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return params
  return run(initial)


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("setup", [_parabola, _rosenbrock], ids=["parabola", "rosenbrock"])
def test_bundled_optimizer_converges_like_optax_requires(name, setup):
  initial, final, objective = setup()
  params = _minimise(optax_learned.load(name), objective, initial, steps=20_000)
  # optax's common tests: 20,000 steps, rtol = atol = 3e-2.
  chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


def _params():
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                    "bias": jnp.zeros((4,), jnp.float32)},
          "scale": jnp.ones((), jnp.float32)}


@pytest.mark.parametrize("name", BUNDLED)
def test_tree_map_params_sees_params_shaped_leaves(name):
  tx = optax_learned.load(name)
  params = _params()
  state = tx.init(params)
  seen = []
  mapped = optax.tree_utils.tree_map_params(tx, lambda p: seen.append(p.shape) or p, state)
  chex.assert_trees_all_equal(mapped, state)
  # Two accumulators, each shaped like every parameter; nothing else is params-like.
  expected = [jnp.shape(p) for p in jax.tree.leaves(params)] * 2
  assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("name", BUNDLED)
def test_state_is_at_most_three_float32_per_parameter(name):
  params = _params()
  state = optax_learned.load(name).init(params)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  per_param_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim) / num_params
  assert per_param_bytes <= 3 * 4


@pytest.mark.parametrize("name", BUNDLED)
def test_inject_hyperparams_matches_the_plain_transformation(name):
  lopt, meta_params = optax_learned.load_weights(name)
  injected = optax.inject_hyperparams(lopt.transform)(meta_params, learning_rate=0.5)
  plain = lopt.transform(meta_params, learning_rate=0.5)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  injected_state, plain_state = injected.init(params), plain.init(params)
  for _ in range(3):
    injected_updates, injected_state = jax.jit(injected.update)(grads, injected_state, params)
    plain_updates, plain_state = jax.jit(plain.update)(grads, plain_state, params)
    chex.assert_trees_all_close(injected_updates, plain_updates, rtol=1e-6)
  assert float(injected_state.hyperparams["learning_rate"]) == 0.5
  # The multiplier can be changed in the state, as a user scheduling it by hand would.
  injected_state.hyperparams["learning_rate"] = jnp.asarray(0.25)
  quarter, _ = injected.update(grads, injected_state, params)
  half, _ = plain.update(grads, plain_state, params)
  chex.assert_trees_all_close(jax.tree.map(lambda u: 2 * u, quarter), half, rtol=1e-5)


@pytest.mark.parametrize("name", BUNDLED)
def test_jit_compiles_the_update_once(name):
  tx = optax_learned.load(name)
  params = _params()
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(4):
    params, state = step(params, state)
  assert len(traces) == 1


_SHARDING_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax, optax_learned
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()), ("x",))
    tx = optax_learned.load({name!r})
    params = {{"kernel": jnp.arange(32.0).reshape(8, 4) / 32, "bias": jnp.zeros(4)}}
    specs = {{"kernel": P("x", None), "bias": P()}}
    shard = lambda tree, spec: jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, spec)
    sharded_params = shard(params, specs)
    state = tx.init(params)
    # The state is sharded with the parameters' own PartitionSpecs.
    state_specs = optax.tree_utils.tree_map_params(
        tx, lambda p, s: s, state, specs, transform_non_params=lambda _: P())
    sharded_state = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                                 state, state_specs)
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    update = jax.jit(tx.update)
    updates, new_state = update(shard(grads, specs), sharded_state, sharded_params)
    expected, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["kernel"], expected["kernel"], rtol=1e-6, atol=1e-9)
    kernel_sharding = sharded_params["kernel"].sharding
    assert new_state.mu["kernel"].sharding.is_equivalent_to(kernel_sharding, 2), (
        new_state.mu["kernel"].sharding)
    assert len(new_state.nu["kernel"].addressable_shards) == 2
    print("OK")
""")


@pytest.mark.parametrize("name", BUNDLED[:1])
def test_state_shards_like_the_parameters_on_a_two_device_mesh(name):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT.format(name=name)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
