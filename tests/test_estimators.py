"""Statistical tests of the meta-gradient estimators against exact gradients."""

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_problems as toy

from metatrain import estimators, truncation
from metatrain.tasks.quadratic import LinearRegressionTask

SIGMA = 0.05


class _Setup(NamedTuple):
  estimator: estimators.EstimatorConfig
  truncation: truncation.TruncationConfig

  @property
  def sigma(self):
    return self.estimator.sigma


def _config(estimator, length, horizon, num_pairs, *, merged_es="pes", sigma=SIGMA,
            meta_loss_every=1, particle_chunk=0, late_weight_power=0.0):
  return _Setup(
      estimators.EstimatorConfig(name=estimator, merged_es=merged_es, num_tasks=1,
                                 num_pairs=num_pairs, sigma=sigma,
                                 particle_chunk=particle_chunk),
      truncation.TruncationConfig(
          length=length, min_horizon=horizon, max_horizon=horizon, log_loss=False,
          loss_clip=1e6, stagger=False, meta_loss_every=meta_loss_every,
          late_weight_power=late_weight_power))


def _repeated_estimates(est, meta_params, num_truncations, reps, data=None, seed=0,
                        last_only=False):
  """Per repetition: the mean of the first ``num_truncations`` estimates of fresh runs (or
  the last of them)."""
  data = {} if data is None else data

  def one_run(key):
    init_key, key = jax.random.split(key)
    state = est.init(meta_params, init_key, data)

    def body(state, k):
      gradient, state, _ = est.estimate(meta_params, state, k, data)
      return state, gradient

    _, gradients = jax.lax.scan(body, state, jax.random.split(key, num_truncations))
    return jax.tree.map(lambda g: g[-1] if last_only else g.mean(0), gradients)

  keys = jax.random.split(jax.random.PRNGKey(seed), reps)
  return np.asarray(jax.jit(jax.vmap(one_run))(keys)["log_lr"])


def _full_horizon_gradient(task, lopt, config, meta_params, num_truncations, samples=4096,
                           perturbation_of_truncation=None):
  """Exact backprop through the whole run, averaged over the perturbations.

  ``perturbation_of_truncation[k]`` numbers the independent perturbation of truncation ``k``
  (default: one per truncation, as PES draws them).
  """
  tcfg = config.truncation
  index = perturbation_of_truncation or list(range(num_truncations))

  def objective(theta, eps):
    state = truncation.init_inner_state(task, lopt, theta, tcfg, jax.random.PRNGKey(0))
    total = 0.0
    for k in range(num_truncations):
      perturbed = {"log_lr": theta["log_lr"] + eps[index[k]]}
      state, out = truncation.unroll(task, lopt, tcfg, perturbed, state, {})
      total += jnp.mean(out.meta_losses)
    return total / num_truncations

  eps = config.sigma * jax.random.normal(jax.random.PRNGKey(123), (samples, num_truncations))
  grads = np.asarray(jax.jit(jax.vmap(jax.grad(objective), in_axes=(None, 0)))(
      meta_params, eps)["log_lr"])
  return grads.mean(), grads.std() / np.sqrt(samples)


def _z_score(samples, reference, reference_se):
  se = samples.std(ddof=1) / np.sqrt(len(samples))
  return abs(samples.mean() - reference) / np.sqrt(se**2 + reference_se**2)


def _assert_unbiased(task, lopt, config, num_truncations, **reference_options):
  """The mean estimate over ``num_truncations`` of fresh runs matches exact backprop."""
  meta_params = lopt.init(None)
  reference, reference_se = _full_horizon_gradient(task, lopt, config, meta_params,
                                                   num_truncations, **reference_options)
  samples = _repeated_estimates(estimators.Estimator(task, lopt, *config), meta_params,
                                num_truncations, 300)
  assert abs(reference) > 10 * reference_se  # a gradient clearly away from zero
  assert _z_score(samples, reference, reference_se) < 4.0


@pytest.mark.parametrize("name,merged_es", [
    ("pathwise", "pes"), ("es", "pes"), ("pes", "pes"), ("merged", "es"), ("merged", "pes")])
def test_single_truncation_estimators_are_unbiased(name, merged_es):
  config = _config(name, length=10, horizon=10, num_pairs=8, merged_es=merged_es)
  _assert_unbiased(toy.DeterministicQuadratic(), toy.LearnedStepSize(np.log(0.5)), config, 1)


@pytest.mark.parametrize("horizon", [20, 18])  # 18: a reset in the middle of a truncation
def test_pes_is_unbiased_over_truncations_where_truncated_estimators_are_not(horizon):
  task, lopt = toy.DeterministicQuadratic(), toy.LearnedStepSize(np.log(0.5))
  meta_params = lopt.init(None)
  z = {}
  for name in ("pes", "es", "pathwise"):
    config = _config(name, length=5, horizon=horizon, num_pairs=8)
    reference, reference_se = _full_horizon_gradient(task, lopt, config, meta_params, 4)
    samples = _repeated_estimates(estimators.Estimator(task, lopt, *config), meta_params, 4, 300)
    z[name] = _z_score(samples, reference, reference_se)
  assert z["pes"] < 4.0, z
  assert z["es"] > 8.0 and z["pathwise"] > 8.0, z


def test_pes_is_unbiased_with_sparse_meta_loss_measurements():
  # One measurement per truncation of 5 steps; horizon 18 resets inside the last truncation,
  # before its measurement, so the accumulated perturbation must not be credited with it.
  config = _config("pes", length=5, horizon=18, num_pairs=8, meta_loss_every=5)
  _assert_unbiased(toy.DeterministicQuadratic(), toy.LearnedStepSize(np.log(0.5)), config, 4)


def test_pes_is_unbiased_for_a_meta_loss_weighted_towards_the_end_of_each_run():
  # Horizon 18 resets inside the last truncation: the weight restarts with the new run.
  task, lopt = toy.DeterministicQuadratic(), toy.LearnedStepSize(np.log(0.5))
  meta_params = lopt.init(None)
  uniform = _config("pes", length=5, horizon=18, num_pairs=8)
  weighted = _config("pes", length=5, horizon=18, num_pairs=8, late_weight_power=2.0)
  reference, reference_se = _full_horizon_gradient(task, lopt, weighted, meta_params, 4)
  uniform_reference, _ = _full_horizon_gradient(task, lopt, uniform, meta_params, 4)
  assert abs(reference - uniform_reference) > 10 * reference_se  # another objective
  samples = _repeated_estimates(estimators.Estimator(task, lopt, *weighted), meta_params, 4,
                                300)
  assert _z_score(samples, reference, reference_se) < 4.0


def test_late_weight_power_weighs_each_measurement_by_its_runs_progress():
  task, lopt = toy.DeterministicQuadratic(), toy.LearnedStepSize(np.log(0.5))
  meta_params = lopt.init(None)
  outputs = {}
  for power in (0.0, 2.0):
    tcfg = _config("pes", length=5, horizon=8, num_pairs=1, late_weight_power=power).truncation
    state = truncation.init_inner_state(task, lopt, meta_params, tcfg, jax.random.PRNGKey(0))
    state, first = truncation.unroll(task, lopt, tcfg, meta_params, state, {})
    _, second = truncation.unroll(task, lopt, tcfg, meta_params, state, {})  # resets at step 8
    outputs[power] = np.concatenate([first.meta_losses, second.meta_losses])
  steps = np.array([1, 2, 3, 4, 5, 6, 7, 8, 1, 2], np.float64)
  np.testing.assert_allclose(outputs[2.0], outputs[0.0] * (steps / 8) ** 2, rtol=1e-5)


def _episode_perturbations(length, horizon, num_truncations):
  """NRES's perturbation of each truncation: a new one after each truncation with a reset."""
  reset_steps = set(range(horizon + 1, length * num_truncations + 1, horizon))
  index = [0]
  for k in range(num_truncations - 1):
    steps = range(k * length + 1, (k + 1) * length + 1)
    index.append(index[-1] + any(step in reset_steps for step in steps))
  return index


# 20: one episode; 18: a reset inside the last truncation; 8: resets inside the second and
# fourth, so the third truncation draws a new perturbation while the run's state still
# depends on the previous one.
@pytest.mark.parametrize("horizon", [20, 18, 8])
def test_noise_reuse_es_is_unbiased_over_truncations(horizon):
  config = _config("nres", length=5, horizon=horizon, num_pairs=8)
  episodes = _episode_perturbations(5, horizon, 4)
  assert episodes == {20: [0, 0, 0, 0], 18: [0, 0, 0, 0], 8: [0, 0, 1, 1]}[horizon]
  _assert_unbiased(toy.DeterministicQuadratic(), toy.LearnedStepSize(np.log(0.5)), config, 4,
                   perturbation_of_truncation=episodes)


def test_noise_reuse_es_keeps_its_perturbation_until_a_truncation_with_a_reset():
  task, lopt = toy.DeterministicQuadratic(), toy.LearnedStepSize(np.log(0.5))
  meta_params = lopt.init(None)
  est = estimators.Estimator(task, lopt, *_config("nres", length=5, horizon=8, num_pairs=2))
  state = est.init(meta_params, jax.random.PRNGKey(0), {})
  estimate = jax.jit(est.estimate)
  used = []
  for k in range(4):
    _, state, _ = estimate(meta_params, state, jax.random.PRNGKey(10 + k), {})
    used.append(np.asarray(state.es.eps["log_lr"]))
  # Resets at steps 9 and 17, inside the second and fourth truncations.
  np.testing.assert_array_equal(used[1], used[0])
  assert np.all(used[2] != used[1])
  np.testing.assert_array_equal(used[3], used[2])
  np.testing.assert_array_equal(np.asarray(state.es.accumulated["log_lr"]), used[3])
  assert bool(np.all(state.es.redraw))


def test_noise_reuse_es_has_lower_variance_than_pes_late_in_an_episode():
  # The 16th truncation of one episode of noisy regression, near its stationary loss, which
  # depends mostly on the recent steps: PES credits it to the sum of 16 perturbations, NRES
  # to one. (On a deterministic quadratic, where every step's learning rate moves the late
  # loss alike, the two measured the same.)
  task, lopt = LinearRegressionTask(dim=4, batch_size=8, noise=1.0), toy.LearnedStepSize(-1.0)
  meta_params, data = lopt.init(None), task.load_data()
  variances = {}
  for name in ("pes", "nres"):
    config = _config(name, length=5, horizon=80, num_pairs=8)
    samples = _repeated_estimates(estimators.Estimator(task, lopt, *config), meta_params, 16,
                                  300, data=data, last_only=True)
    variances[name] = samples.var(ddof=1)
  # Measured 0.22; the variance of a sample variance from 300 draws is about 8%.
  assert variances["nres"] < 0.5 * variances["pes"], variances


def test_sparse_meta_loss_measures_a_subset_of_the_same_steps():
  task, lopt = LinearRegressionTask(dim=3), toy.LearnedStepSize(-2.0)
  meta_params, data = lopt.init(None), task.load_data()
  dense = truncation.TruncationConfig(length=6, min_horizon=8, max_horizon=8,
                                      stagger=False)
  sparse = dataclasses.replace(dense, meta_loss_every=3)
  state = truncation.init_inner_state(task, lopt, meta_params, dense, jax.random.PRNGKey(0))
  state = state._replace(step=jnp.asarray(4, jnp.int32))  # resets at the third step
  dense_state, dense_out = truncation.unroll(task, lopt, dense, meta_params, state, data)
  sparse_state, sparse_out = truncation.unroll(task, lopt, sparse, meta_params, state, data)
  assert sparse_out.meta_losses.shape == (2,)
  np.testing.assert_array_equal(sparse_out.meta_losses, dense_out.meta_losses[2::3])
  np.testing.assert_array_equal(sparse_out.train_losses, dense_out.train_losses)
  np.testing.assert_array_equal(sparse_out.resets, dense_out.resets)
  chex.assert_trees_all_equal(sparse_state, dense_state)
  np.testing.assert_array_equal(
      truncation.resets_before_measurements(sparse, sparse_out.resets), [False, True])
  with pytest.raises(ValueError, match="meta_loss_every must be a positive divisor"):
    dataclasses.replace(dense, meta_loss_every=4)


def test_remat_gives_the_same_pathwise_gradient():
  task, lopt = LinearRegressionTask(dim=3), toy.LearnedStepSize(-2.0)
  meta_params, data = lopt.init(None), task.load_data()
  plain = truncation.TruncationConfig(length=4, min_horizon=6, max_horizon=6,
                                      stagger=False)
  state = truncation.init_inner_state(task, lopt, meta_params, plain, jax.random.PRNGKey(0))

  def gradient(config):
    loss = lambda theta: jnp.mean(
        truncation.unroll(task, lopt, config, theta, state, data)[1].meta_losses)
    return jax.jit(jax.grad(loss))(meta_params)

  chex.assert_trees_all_close(gradient(dataclasses.replace(plain, remat=True)),
                              gradient(plain), rtol=1e-6)


def test_merged_variance_is_no_larger_than_either_part():
  task, lopt = LinearRegressionTask(dim=4, batch_size=8, noise=1.0), toy.LearnedStepSize(-2.0)
  meta_params, data = lopt.init(None), task.load_data()
  variances = {}
  for name in ("pathwise", "es", "merged"):
    config = _config(name, length=10, horizon=10, num_pairs=16, merged_es="es")
    samples = _repeated_estimates(estimators.Estimator(task, lopt, *config), meta_params, 1, 400,
                                  data=data)
    variances[name] = samples.var(ddof=1)
  # The variance of a sample variance from 400 draws has a relative error of about 7%.
  assert variances["merged"] <= 1.25 * min(variances["pathwise"], variances["es"]), variances


def test_pathwise_gradient_norm_explodes_with_unroll_length():
  task, lopt = toy.DeterministicQuadratic(curvature=(1.0,)), toy.LearnedStepSize(np.log(2.2))
  meta_params = lopt.init(None)
  norms = []
  for length in (2, 4, 8, 16):
    config = _config("pathwise", length=length, horizon=length, num_pairs=1, sigma=1e-6)
    est = estimators.Estimator(task, lopt, *config)
    state = est.init(meta_params, jax.random.PRNGKey(0), {})
    _, _, diagnostics = jax.jit(est.estimate)(meta_params, state, jax.random.PRNGKey(1), {})
    norms.append(float(diagnostics["pathwise_norm"]))
  assert all(b > 2 * a for a, b in zip(norms, norms[1:], strict=False)), norms
  assert norms[-1] > 100 * norms[0], norms


def test_antithetic_pairs_cancel_shared_noise_exactly_on_a_linear_objective():
  task, lopt = toy.NoisyLinear(), toy.ConstantStep()
  meta_params = lopt.init(None)
  config = _config("es", length=4, horizon=8, num_pairs=1, sigma=0.1)
  est = estimators.Estimator(task, lopt, *config)
  key = jax.random.PRNGKey(7)
  eps = estimators.sample_perturbations(meta_params, key, 1, config.sigma)["theta"][0]
  # Meta-loss after step s is -(s + 1) theta + noise_s: the pair's difference is -5 eps.
  expected = float(-2.5 * eps**2 / config.sigma**2)
  for init_seed in range(3):  # different runs: different batch noise
    state = est.init(meta_params, jax.random.PRNGKey(init_seed), {})
    gradient, _, _ = jax.jit(est.estimate)(meta_params, state, key, {})
    np.testing.assert_allclose(float(gradient["theta"]), expected, rtol=1e-4)


@pytest.mark.parametrize("position", range(5))
def test_reset_masking_at_every_position(position):
  task, lopt = LinearRegressionTask(dim=3), toy.LearnedStepSize(-2.0)
  meta_params, data = lopt.init(None), task.load_data()
  config = truncation.TruncationConfig(length=5, min_horizon=10, max_horizon=10,
                                       log_loss=False, loss_clip=1e6, stagger=False)
  state = truncation.init_inner_state(task, lopt, meta_params, config, jax.random.PRNGKey(0))
  state = state._replace(step=jnp.asarray(10 - position, jnp.int32))
  _, out = truncation.unroll(task, lopt, config, meta_params, state, data)
  np.testing.assert_array_equal(out.resets, np.arange(5) == position)
  # After the reset the losses are those of a fresh run with the next run key.
  fresh = truncation.init_inner_state(task, lopt, meta_params, config,
                                      jax.random.PRNGKey(0))._replace(
      run_key=jax.random.split(state.run_key)[1])
  fresh = truncation._fresh_run(task, lopt.transform(meta_params), config, fresh.run_key)
  _, fresh_out = truncation.unroll(task, lopt, config, meta_params, fresh, data)
  np.testing.assert_allclose(out.meta_losses[position:], fresh_out.meta_losses[:5 - position],
                             rtol=1e-6)

  # PES attributes steps before the reset to the accumulated perturbation only.
  eps, accumulated = {"a": jnp.ones((1,))}, {"a": jnp.full((1,), 10.0)}
  grads, new_accumulated = estimators.pes_gradient(
      eps, accumulated, jnp.ones((1, 5)), out.resets[None], sigma=1.0)
  np.testing.assert_allclose(grads["a"], [(1.0 + 10.0 * position / 5) / 2.0], rtol=1e-6)
  np.testing.assert_allclose(new_accumulated["a"], [1.0])


def test_pes_accumulates_without_reset():
  eps, accumulated = {"a": jnp.ones((1,))}, {"a": jnp.full((1,), 10.0)}
  grads, new_accumulated = estimators.pes_gradient(
      eps, accumulated, jnp.ones((1, 5)), jnp.zeros((1, 5), bool), sigma=1.0)
  np.testing.assert_allclose(grads["a"], [11.0 / 2.0])
  np.testing.assert_allclose(new_accumulated["a"], [11.0])


def test_merge_by_inverse_variance_weights():
  rp = {"w": jnp.array([[1.0, 0.0], [1.0, 4.0]])}   # variances 0 and 4
  es = {"w": jnp.array([[0.0, 1.0], [4.0, 1.0]])}   # variances 4 and 0
  merged, es_weight = estimators.merge_by_inverse_variance(rp, es)
  np.testing.assert_allclose(merged["w"], [1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(es_weight["w"], [0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 6])
def test_map_particles_matches_vmap(chunk):
  xs = {"a": jnp.arange(12.0).reshape(6, 2), "b": jnp.arange(6)}
  fn = lambda x: {"sum": jnp.sum(x["a"]) * x["b"], "a": x["a"] * 2}
  chex.assert_trees_all_equal(estimators.map_particles(fn, xs, chunk), jax.vmap(fn)(xs))
  with pytest.raises(ValueError, match="particle_chunk must divide the 6 particles"):
    estimators.map_particles(fn, xs, 4)


def test_chunked_estimates_match_vectorised_ones():
  task, lopt = LinearRegressionTask(dim=3), toy.LearnedStepSize(-2.0)
  meta_params, data = lopt.init(None), task.load_data()
  results = []
  for chunk in (0, 1, 2):
    config = _config("merged", length=4, horizon=6, num_pairs=4, particle_chunk=chunk)
    est = estimators.Estimator(task, lopt, *config)
    state = est.init(meta_params, jax.random.PRNGKey(0), data)
    results.append(jax.jit(est.estimate)(meta_params, state, jax.random.PRNGKey(1), data))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5)
  chex.assert_trees_all_close(results[0], results[2], rtol=1e-5)
  with pytest.raises(ValueError, match=r"particle_chunk must be -1 \(automatic\), 0 or divide"):
    estimators.EstimatorConfig(num_tasks=1, num_pairs=4, particle_chunk=3)


def test_a_new_estimator_is_one_registry_entry(monkeypatch):
  """Composing registered parts gives the same estimate as the built-in composition."""
  from metatrain.estimators import combine, estimator
  monkeypatch.setitem(estimator.ESTIMATORS, "merged_antithetic", estimators.EstimatorSpec(
      pathwise=True, es_side="es", combiner=combine.inverse_variance))
  task, lopt = LinearRegressionTask(dim=3), toy.LearnedStepSize(-2.0)
  meta_params, data = lopt.init(None), task.load_data()
  results = []
  for name, merged_es in (("merged_antithetic", "pes"), ("merged", "es")):
    config = _config(name, length=4, horizon=6, num_pairs=4, merged_es=merged_es)
    est = estimators.Estimator(task, lopt, *config)
    state = est.init(meta_params, jax.random.PRNGKey(0), data)
    assert state.es == ()  # antithetic ES keeps no state of its own
    results.append(jax.jit(est.estimate)(meta_params, state, jax.random.PRNGKey(1), data))
  chex.assert_trees_all_equal(results[0], results[1])
