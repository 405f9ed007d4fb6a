"""Growing truncations: the length schedule, segmented unrolls and estimates over them."""

import dataclasses
import functools
import json

import chex
import jax
import numpy as np
import pytest
import toy_problems as toy
from test_estimators import _full_horizon_gradient, _repeated_estimates, _Setup, _z_score

from metatrain import configs, estimators, truncation
from metatrain import trainer as trainer_lib
from metatrain.tasks.quadratic import LinearRegressionTask

SEGMENTED = truncation.TruncationConfig(length=4, min_horizon=40, max_horizon=40, log_loss=False,
                                        loss_clip=1e6, stagger=False, max_segments=3)


def test_the_schedule_grows_linearly_then_stays_and_jitters_within_bounds():
  config = dataclasses.replace(SEGMENTED, max_segments=5, growth_steps=8)
  key = jax.random.PRNGKey(0)
  assert [int(truncation.scheduled_segments(config, s, key)) for s in (0, 2, 4, 6, 8, 100)] == [
      1, 2, 3, 4, 5, 5]
  jittered = dataclasses.replace(config, jitter=0.2)
  draws = {int(truncation.scheduled_segments(jittered, 100, k))
           for k in jax.random.split(key, 200)}
  assert draws == {4, 5}  # 5 x U(0.8, 1.2), rounded, at most max_segments
  assert int(truncation.scheduled_segments(SEGMENTED, 0, key)) == 3  # no growth_steps: all
  with pytest.raises(ValueError, match=r"truncation.jitter must be in \[0, 1\)"):
    dataclasses.replace(SEGMENTED, jitter=1.0)


def test_segments_are_consecutive_unrolls_and_skipped_ones_are_masked():
  task, lopt = LinearRegressionTask(dim=3), toy.LearnedStepSize(-2.0)
  meta_params, data = lopt.init(None), task.load_data()
  whole = dataclasses.replace(SEGMENTED, length=8, max_segments=1)
  state = truncation.init_inner_state(task, lopt, meta_params, SEGMENTED, jax.random.PRNGKey(0))
  two, out_two = truncation.unroll_segments(task, lopt, SEGMENTED, meta_params, state, data, 2)
  eight, out_eight = truncation.unroll(task, lopt, whole, meta_params, state, data)
  chex.assert_trees_all_close(two, eight, rtol=1e-6)
  assert out_two.measured.tolist() == [True] * 8 + [False] * 4
  np.testing.assert_allclose(out_two.meta_losses[:8], out_eight.meta_losses, rtol=1e-6)
  np.testing.assert_array_equal(out_two.meta_losses[8:], 0.0)


@pytest.mark.parametrize("name", ["pathwise", "es", "pes", "merged"])
def test_an_estimate_over_segments_equals_one_over_the_whole_truncation(name):
  task, lopt = LinearRegressionTask(dim=3), toy.LearnedStepSize(-2.0)
  meta_params, data = lopt.init(None), task.load_data()
  config = estimators.EstimatorConfig(name=name, num_tasks=2, num_pairs=2, sigma=0.05,
                                      particle_chunk=0)
  results = []
  for tcfg, segments in ((SEGMENTED, 2), (dataclasses.replace(SEGMENTED, length=8,
                                                              max_segments=1), 1)):
    est = estimators.Estimator(task, lopt, config, tcfg)
    estimate = jax.jit(est.estimate)
    state = est.init(meta_params, jax.random.PRNGKey(0), data)
    first, state, diagnostics = estimate(meta_params, state, jax.random.PRNGKey(1), data,
                                         segments)
    second, _, _ = estimate(meta_params, state, jax.random.PRNGKey(2), data, segments)
    results.append((first, second, diagnostics["meta_loss"], diagnostics["train_loss"]))
    assert float(diagnostics["truncation_length"]) == 8
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5)


def test_pes_over_growing_truncations_with_resets_is_unbiased():
  """Truncations of two 5-step segments, runs of 18 steps: resets fall inside truncations."""
  task, lopt = toy.DeterministicQuadratic(), toy.LearnedStepSize(np.log(0.5))
  meta_params = lopt.init(None)
  config = estimators.EstimatorConfig(name="pes", num_tasks=1, num_pairs=8, sigma=0.05,
                                      particle_chunk=0)
  segmented = truncation.TruncationConfig(length=5, min_horizon=18, max_horizon=18,
                                          log_loss=False, loss_clip=1e6, stagger=False,
                                          max_segments=2)
  est = estimators.Estimator(task, lopt, config, segmented)
  two_segments = _Segments(est, 2)
  reference, reference_se = _full_horizon_gradient(
      task, lopt, _Setup(config, dataclasses.replace(segmented, length=10, max_segments=1)),
      meta_params, 2)
  samples = _repeated_estimates(two_segments, meta_params, 2, 300)
  assert abs(reference) > 10 * reference_se
  assert _z_score(samples, reference, reference_se) < 4.0


@dataclasses.dataclass(frozen=True)
class _Segments:
  """An estimator whose estimates always run ``num_segments`` segments."""
  estimator: estimators.Estimator
  num_segments: int

  def init(self, *args):
    return self.estimator.init(*args)

  def estimate(self, *args):
    return functools.partial(self.estimator.estimate, num_segments=self.num_segments)(*args)


def test_meta_training_logs_its_growing_truncations(tmp_path):
  config = configs.get_config("quadratic").with_overrides(
      ["steps=6", "log_every=1", "checkpoint_every=6", "truncation.max_segments=3",
       "truncation.growth_steps=4"])
  trainer_lib.MetaTrainer(config, tmp_path, progress=False).train()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # 1 + 2 * min(step / 4, 1) segments of 5 steps, rounded half to even: 1, 2, 2, 2, 3, 3.
  assert [r["truncation_length"] for r in records] == [5, 10, 10, 10, 15, 15]
