"""Tests of the evaluation harness: outputs, learning-rate selection, cache and summary math."""

import json
import math

import jax
import numpy as np
import optax
import pytest

import optax_learned
from metatrain import evaluation, evaluation_report

LEARNING_RATES = (1e-2, 1e-1)
PROTOCOL = dict(steps=20, seeds=2, eval_every=10, learning_rates=LEARNING_RATES,
                num_eval_batches=2, timing_reps=2)


@pytest.fixture
def learned_path(tmp_path):
  """A small untrained learned optimizer checkpoint."""
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,))
  return str(optax_learned.save(tmp_path / "lopt", lopt, lopt.init(jax.random.key(0))))


@pytest.fixture
def counted(monkeypatch):
  """Counts the baseline and learned-optimizer training runs of ``evaluate``."""
  calls = {"baseline": 0, "learned": 0}
  train_baseline, evaluate_transformation = (evaluation.train_baseline,
                                             evaluation.evaluate_transformation)

  def count_baseline(*args, **kwargs):
    calls["baseline"] += 1
    return train_baseline(*args, **kwargs)

  def count_learned(*args, **kwargs):
    calls["learned"] += 1
    return evaluate_transformation(*args, **kwargs)

  monkeypatch.setattr(evaluation, "train_baseline", count_baseline)
  monkeypatch.setattr(evaluation, "evaluate_transformation", count_learned)
  return calls


def test_evaluate_outputs_selection_and_cache(tmp_path, learned_path, counted):
  kwargs = dict(PROTOCOL, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
  results = evaluation.evaluate(learned_path, "linear_regression", **kwargs)
  assert counted == {"baseline": 6, "learned": 1}

  out = tmp_path / "out"
  for name in ("results.json", "curves.json", "results.md", "loss_vs_step.png",
               "loss_vs_time.png"):
    assert (out / name).stat().st_size > 0
  # results.json holds the summaries and final metrics; the per-step curves are in curves.json.
  summary_only = json.loads((out / "results.json").read_text())
  assert "train_loss" not in summary_only["learned"]["run"]
  assert summary_only["learned"]["run"]["final"]["train_loss"] == pytest.approx(
      results["learned"]["run"]["mean"]["train_loss"][-1])
  stored = evaluation_report.read_results(out)
  assert {"schema_version", "task", "protocol", "environment", "learned", "baselines",
          "summary"} <= set(stored)
  assert stored["protocol"]["eval_seeds"] == [10_000, 10_001]
  run = stored["learned"]["run"]
  assert run["steps"] == [0, 10, 20] and run["seeds"] == [10_000, 10_001]
  for curve in ("train_loss", "valid_loss", "seconds"):
    assert np.asarray(run[curve], float).shape == (2, 3)
  assert run["accuracy"] is None  # linear regression has no accuracy
  assert np.all(np.diff(np.asarray(run["seconds"], float), axis=1) > 0)

  summary = stored["summary"]
  assert set(summary["baselines"]) == {"adam", "sgd_momentum", "rmsprop"}
  for name, baseline in stored["baselines"].items():
    assert baseline["learning_rates"] == list(LEARNING_RATES)
    losses = baseline["final_valid_loss_by_lr"]
    chosen = baseline["best_learning_rate"]
    assert losses[repr(chosen)] == min(losses.values())
    assert summary["baselines"][name]["learning_rate"] == chosen
    final = np.mean(np.asarray(baseline["runs"][repr(chosen)]["valid_loss"], float)[:, -1])
    assert summary["baselines"][name]["final_valid_loss"] == pytest.approx(final)
  best = min(summary["baselines"], key=lambda n: summary["baselines"][n]["final_valid_loss"])
  assert summary["best_baseline"] == best and summary["vs_best"]["baseline"] == best
  assert results["summary"]["best_baseline"] == best
  assert set(summary["comparisons"]) == set(summary["baselines"])
  assert {"steps_to_target", "seconds_to_target", "steps_ratio", "seconds_ratio",
          "final_train_loss", "final_valid_loss", "final_accuracy"} <= set(summary["vs_best"])
  assert {"diverged", "stable"} <= set(summary["learned"])
  assert "| learned" in (out / "results.md").read_text()
  # Step costs timed interleaved give the load-independent wall-clock ratio.
  costs = stored["learned"]["step_seconds_interleaved"]
  assert set(costs) == {"learned", "adam", "sgd_momentum", "rmsprop"}
  assert all(c > 0 for c in costs.values())
  for name, comparison in summary["comparisons"].items():
    assert comparison["step_cost_ratio"] == pytest.approx(costs["learned"] / costs[name])
    if comparison["steps_ratio"] is not None:
      assert comparison["interleaved_time_ratio"] == pytest.approx(
          comparison["steps_ratio"] * comparison["step_cost_ratio"])
  assert "time ratio (interleaved)" in (out / "results.md").read_text()
  # loss_vs_time.png puts every curve on the equal-load axis (steps x interleaved cost) ...
  seconds, label = evaluation_report.wall_clock_axes(stored)
  assert set(seconds) == set(costs) and "interleaved" in label
  for name, xs in seconds.items():
    np.testing.assert_allclose(xs, np.asarray(run["steps"], float) * costs[name])
  # ... and falls back to measured seconds where no interleaved costs were recorded.
  del stored["learned"]["step_seconds_interleaved"]
  seconds, label = evaluation_report.wall_clock_axes(stored)
  assert "measured" in label
  np.testing.assert_allclose(seconds["learned"], np.mean(run["seconds"], axis=0))

  again = evaluation.evaluate(learned_path, "linear_regression", **kwargs)
  assert counted == {"baseline": 6, "learned": 2}  # baselines came from the cache
  assert all(all(b["cached"]) for b in again["baselines"].values())
  for name in stored["baselines"]:
    assert again["summary"]["baselines"][name]["final_valid_loss"] == pytest.approx(
        summary["baselines"][name]["final_valid_loss"])
  # The learned optimizer's run is deterministic given the evaluation seeds.
  np.testing.assert_allclose(again["learned"]["run"]["train_loss"], run["train_loss"],
                             rtol=1e-6)

  # Another grid reuses the cached learning rates and trains only the new one.
  evaluation.evaluate(None, "linear_regression", **dict(
      kwargs, learning_rates={"adam": (1e-2, 1e-1, 1.0)}, baselines=("adam",)))
  assert counted == {"baseline": 7, "learned": 2}


def test_load_kwargs_reach_the_learned_optimizer_and_are_recorded(tmp_path, learned_path,
                                                                   counted):
  kwargs = dict(PROTOCOL, baselines=("adam",), learning_rates=(1e-2,), timing_reps=0,
                cache_dir=tmp_path / "cache")
  plain = evaluation.evaluate(learned_path, "linear_regression", out_dir=tmp_path / "a",
                              **kwargs)
  told = evaluation.evaluate(learned_path, "linear_regression", out_dir=tmp_path / "b",
                             load_kwargs={"num_steps": 20}, **kwargs)
  assert plain["learned"]["load_kwargs"] == {}
  assert told["learned"]["load_kwargs"] == {"num_steps": 20}
  first, last = (np.asarray(r["learned"]["run"]["train_loss"]) for r in (plain, told))
  assert not np.allclose(first, last)  # the cosine decay changed the run
  # A bad keyword fails before anything trains.
  before = dict(counted)
  with pytest.raises(ValueError, match="num_steps must be a positive integer"):
    evaluation.evaluate(learned_path, "linear_regression", out_dir=tmp_path / "c",
                        load_kwargs={"num_steps": 0}, **kwargs)
  assert counted == before


def test_protocol_object_and_keywords_agree(tmp_path):
  protocol = evaluation.EvaluationProtocol(steps=4, seeds=1, baselines=("adam",),
                                           learning_rates=(1e-2,), num_eval_batches=1,
                                           timing_reps=0)
  assert protocol.resolved_eval_every == 1
  assert protocol.record()["eval_seeds"] == [10_000]
  kwargs = dict(out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
  by_object = evaluation.evaluate(None, "linear_regression", protocol=protocol, **kwargs)
  by_keywords = evaluation.evaluate(None, "linear_regression", steps=4, seeds=1,
                                    baselines=("adam",), learning_rates=(1e-2,),
                                    num_eval_batches=1, timing_reps=0, **kwargs)
  assert by_object["protocol"] == by_keywords["protocol"]
  assert all(by_keywords["baselines"]["adam"]["cached"])  # the same cache key
  # Keywords replace fields of a given protocol.
  longer = evaluation.evaluate(None, "linear_regression", protocol=protocol, steps=8, **kwargs)
  assert longer["protocol"]["steps"] == 8
  with pytest.raises(ValueError, match="seeds must be a positive integer"):
    evaluation.EvaluationProtocol(seeds=0)
  with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['lion'\]"):
    evaluation.evaluate(None, "linear_regression", baselines=("lion",), **kwargs)
  with pytest.raises(ValueError, match="learning rates of adam must be positive"):
    evaluation.EvaluationProtocol(learning_rates={"adam": (0.0,)})
  with pytest.raises(TypeError, match="unexpected keyword"):
    evaluation.evaluate(None, "linear_regression", step=4, **kwargs)


def test_evaluate_transformation_with_accuracy_and_divergence():
  run = evaluation.evaluate_transformation(optax.adam(1e-2), "digits_mlp", steps=6, seeds=1,
                                           eval_every=3, num_eval_batches=2)
  assert run["steps"] == [0, 3, 6]
  accuracy = np.asarray(run["accuracy"], float)
  assert accuracy.shape == (1, 3) and np.all((accuracy >= 0) & (accuracy <= 1))
  assert run["diverged"] == [False] and run["seconds_per_step"][0] > 0

  # Shares the compiled sgd_momentum step of the test above (one step for all rates).
  diverging = evaluation.train_baseline("sgd_momentum", 1e6, "linear_regression", steps=40,
                                        seeds=1, eval_every=10, num_eval_batches=2)
  assert diverging["diverged"] == [True]
  assert math.isnan(diverging["train_loss"][0][-1])
  flags = evaluation.stability(diverging, total_steps=40)
  assert flags["diverged"] and not flags["stable"]


def test_time_to_target_interpolates():
  steps, seconds, losses = [0, 10, 20, 30], [0.0, 1.0, 3.0, 4.0], [4.0, 3.0, 1.0, 0.5]
  assert evaluation.time_to_target(steps, seconds, losses, 2.0) == (15.0, 2.0)
  assert evaluation.time_to_target(steps, seconds, losses, 1.0) == (20.0, 3.0)
  assert evaluation.time_to_target(steps, seconds, losses, 5.0) == (0.0, 0.0)
  assert evaluation.time_to_target(steps, seconds, losses, 0.1) == (None, None)
  assert evaluation.time_to_target(steps, seconds, [4.0, float("nan"), 1.0, 0.5], 2.0) == (
      20.0, 3.0)
  assert evaluation.time_to_target(steps, seconds, losses, float("nan")) == (None, None)


def _run(losses, seconds):
  run = {"steps": [0, 10, 20, 30], "train_loss": [losses], "valid_loss": [losses],
         "seconds": [seconds], "seconds_per_step": [seconds[-1] / 30]}
  run["mean"] = evaluation.mean_curves(run)
  return run


def test_compare_and_stability_on_constructed_curves():
  baseline = _run([4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0])
  learned = _run([4.0, 2.0, 1.0, 0.8], [0.0, 2.0, 4.0, 6.0])
  result = evaluation.compare(learned, baseline)
  assert result["target_train_loss"] == 1.0
  assert result["baseline_steps_to_target"] == 30.0
  assert result["steps_to_target"] == 20.0 and result["seconds_to_target"] == 4.0
  assert result["steps_ratio"] == pytest.approx(2 / 3)
  assert result["seconds_ratio"] == pytest.approx(4 / 3)
  assert result["final_train_loss"] == 0.8 and result["baseline_final_train_loss"] == 1.0
  # Never reaching the target gives None, not a ratio.
  assert evaluation.compare(baseline, learned)["steps_ratio"] is None

  # Reference point: the evaluation step nearest steps // 5 = 6, i.e. step 10.
  assert evaluation.stability(learned, 30) == {
      "diverged": False, "stable": True, "reference_step": 10, "reference_train_loss": 2.0}
  worse = _run([4.0, 1.0, 1.0, 1.2], [0.0, 1.0, 2.0, 3.0])
  assert not evaluation.stability(worse, 30)["stable"]
  assert evaluation.best_learning_rate({0.1: _run([1, 1, 1, float("nan")], [0, 1, 2, 3]),
                                        0.01: worse, 0.001: baseline}) == 0.001
