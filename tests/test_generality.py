"""Tests of the generality suite: its models, the cached protocol and the summary."""

import json

import jax
import numpy as np
import pytest

import optax_learned
from metatrain import data as data_lib
from metatrain.generality import models, protocol, suite


@pytest.fixture
def cifar_dir(tmp_path):
  """A directory with a tiny synthetic CIFAR-10 training split (10,200 rows: the suite's
  holdout rows need 5,000, and the validation rows before them another 5,000)."""
  rng = np.random.default_rng(0)
  n = 10_200
  np.savez(tmp_path / data_lib.TRAIN_FILE,
           x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
           y=(np.arange(n) % 10).astype(np.uint8))
  return str(tmp_path)


def test_suite_covers_what_the_issue_lists():
  names = set(models.SUITE)
  cifar = [m for m in models.SUITE.values() if m.in_domain]
  assert len(cifar) >= 8
  assert {m.dataset for m in models.SUITE.values() if not m.in_domain} == {"text", "digits"}
  batch_sizes = {m.batch_size for m in cifar}
  assert min(batch_sizes) == 32 and max(batch_sizes) >= 512
  assert {"flatten_conv", "batchnorm_maxpool", "resnet", "pixel_mlp",
          "patch_transformer"} <= names


@pytest.mark.parametrize("name", sorted(models.SUITE))
def test_every_suite_model_initialises_and_gives_a_finite_loss(name, cifar_dir):
  model = models.SUITE[name]
  tx = optax_learned.load("cifar")
  run = protocol._Run(model, tx, protocol.FIRST_SEED, cifar_dir)
  loss = run.train_step(jax.random.key(0))
  assert np.isfinite(float(loss))
  if name == "pixel_mlp":
    assert models.count_params(run.params) >= 500_000


def test_smoothed_is_a_trailing_mean():
  curve = suite.smoothed(np.arange(6.0), 3)
  np.testing.assert_allclose(curve, [np.nan, np.nan, 1.0, 2.0, 3.0, 4.0])


def test_suite_runs_caches_and_summarises(cifar_dir, tmp_path):
  out = tmp_path / "out"
  optimizer = tmp_path / "opt"
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,))
  optax_learned.save(optimizer, lopt, lopt.init(jax.random.key(0)))
  argv = ["--optimizer", f"mine={optimizer}", "--models", "softmax_regression_b512,digits_mlp",
          "--steps", "60", "--horizons", "30,60", "--eval-every", "30", "--seeds", "2",
          "--smoothing", "10", "--train-eval-every", "10", "--timing-reps", "5", "--num-steps",
          "--data-dir", cifar_dir, "--out", str(out)]
  assert suite.main(argv) == 0
  results = json.loads((out / "results.json").read_text())
  assert [m["model"] for m in results["models"]] == ["softmax_regression_b512", "digits_mlp"]
  for summary in results["models"]:
    assert len(summary["adam_grid_final_train"]) == 6
    horizons = summary["optimizers"]["mine"]["horizons"]
    assert set(horizons) == {"30", "60"}
    for h in horizons.values():
      assert h["late_rise"] >= 1.0 and h["adam_late_rise"] >= 1.0
      assert h["minibatch_late_rise"] >= 1.0
      assert np.isfinite(h["final_valid"]) and np.isfinite(h["adam_final_valid"])
      assert h["steps_fraction"] is None or 0 < h["steps_fraction"] <= 1
    assert summary["optimizers"]["mine"]["step_cost_ratio"] > 0
    assert set(summary["optimizers"]["mine+num_steps"]["horizons"]) == {"30", "60"}
  # Told the horizon, the learned optimizer runs once per horizon, for that many steps.
  for horizon in (30, 60):
    run = json.loads((out / "runs" / "digits_mlp" / f"mine+num_steps@{horizon}_seed"
                      f"{protocol.FIRST_SEED}.json").read_text())
    assert len(run["train_losses"]) == horizon
    assert list(run["train_eval_losses"]) == [str(s) for s in range(10, horizon + 1, 10)]
    assert set(run["valid_losses"]) == {str(h) for h in (30, 60) if h <= horizon}
  # The late rise is the worst seed's, read from the fixed training rows.
  digits = results["models"][1]["optimizers"]["mine"]["horizons"]["30"]
  runs = [json.loads((out / "runs" / "digits_mlp" / f"mine_seed{protocol.FIRST_SEED + i}.json")
                     .read_text()) for i in range(2)]
  assert digits["late_rise"] == max(suite.late_rise(r, 30) for r in runs)
  assert "| digits_mlp (outside CIFAR-10) | 60 |" in (out / "results.md").read_text()
  assert (out / "loss_curves.png").stat().st_size > 0
  # The per-step curves are in curves.json, not results.json; read_results joins them.
  assert all("curves" not in m for m in results["models"])
  joined = suite.read_results(out)["models"]
  assert [m["model"] for m in joined] == [m["model"] for m in results["models"]]
  assert all(set(m["curves"]) == {"adam", "mine", "mine+num_steps"} for m in joined)
  # Every run is cached: a second invocation trains nothing and gives the same summary.
  cached = sorted(p.name for p in (out / "runs" / "digits_mlp").iterdir())
  assert len(cached) >= 6 + 2 + 2 * 2
  before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
  assert suite.main(argv) == 0
  assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == before
  # Another step multiplier is another optimizer: it gets its own label (and runs).
  half = [a for a in argv if a != "--num-steps"] + ["--learning-rate", "0.5"]
  assert suite.main(half) == 0
  assert "mine_lr0.5" in json.loads((out / "results.json").read_text())["models"][0][
      "optimizers"]
  assert (out / "runs" / "digits_mlp" / f"mine_lr0.5_seed{protocol.FIRST_SEED}.json").is_file()
  # Other weights under the same label and path are another optimizer: its runs are redone.
  optax_learned.save(optimizer, lopt, lopt.init(jax.random.key(1)), overwrite=True)
  before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
  assert suite.main(argv) == 0
  after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
  changed = {p.name for p in before if after[p] != before[p]}
  assert changed and all(name.startswith("mine") for name in changed)
  assert f"mine_seed{protocol.FIRST_SEED}.json" in changed


def test_late_rise_reads_the_fixed_training_rows():
  run = {"train_eval_losses": {"100": 2.0, "200": 1.0, "300": 1.2, "400": 0.9}}
  assert suite.late_rise(run, 200) == 1.0
  assert suite.late_rise(run, 300) == pytest.approx(1.2)
  assert suite.late_rise(run, 400) == 1.0
  assert suite.late_rise({"train_eval_losses": {"100": 2.0, "200": float("nan")}},
                         200) == float("inf")


def test_protocol_rejects_a_horizon_without_a_training_loss_measurement():
  with pytest.raises(ValueError, match="train_eval_every"):
    protocol.ProtocolConfig(steps=1000, horizons=(1000,), eval_every=500,
                            train_eval_every=300)


def test_suite_merges_an_earlier_output_with_the_same_protocol(cifar_dir, tmp_path):
  optimizer = tmp_path / "opt"
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,))
  optax_learned.save(optimizer, lopt, lopt.init(jax.random.key(0)))
  common = ["--optimizer", f"mine={optimizer}", "--steps", "20", "--horizons", "20",
            "--eval-every", "20", "--seeds", "1", "--smoothing", "10",
            "--train-eval-every", "10", "--timing-reps", "2", "--data-dir", cifar_dir]
  first, second = tmp_path / "first", tmp_path / "second"
  assert suite.main(common + ["--models", "digits_mlp", "--out", str(first)]) == 0
  assert suite.main(common + ["--models", "softmax_regression_b512", "--out", str(second),
                              "--merge", str(first)]) == 0
  merged = suite.read_results(second)
  # Both models, in the suite's order, the earlier one as it was summarised there.
  assert [m["model"] for m in merged["models"]] == ["softmax_regression_b512", "digits_mlp"]
  assert merged["models"][1] == suite.read_results(first)["models"][0]
  assert merged["merged_from"] == [str(first)]
  assert "| digits_mlp (outside CIFAR-10) | 20 |" in (second / "results.md").read_text()
  # Another protocol, or other weights under the same label, cannot be merged.
  with pytest.raises(ValueError, match=r"protocol differs .*\['seeds'\]"):
    suite.main([a if a != "1" else "2" for a in common]
               + ["--models", "softmax_regression_b512", "--out", str(tmp_path / "third"),
                  "--merge", str(first)])
  optax_learned.save(optimizer, lopt, lopt.init(jax.random.key(1)), overwrite=True)
  with pytest.raises(ValueError, match="optimizer 'mine' has fingerprint"):
    suite.main(common + ["--models", "softmax_regression_b512", "--out", str(second),
                         "--merge", str(first)])


def test_suite_reads_tuned_adam_from_an_earlier_output(cifar_dir, tmp_path):
  """--adam-from: the learned optimizer is run, Adam is not, and the comparison is the one
  the earlier output made (the same runs give the same summary)."""
  optimizer = tmp_path / "opt"
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,))
  optax_learned.save(optimizer, lopt, lopt.init(jax.random.key(0)))
  common = ["--optimizer", f"mine={optimizer}", "--models", "digits_mlp", "--steps", "20",
            "--horizons", "10,20", "--eval-every", "10", "--seeds", "2", "--smoothing", "5",
            "--train-eval-every", "10", "--timing-reps", "2", "--data-dir", cifar_dir]
  first, second = tmp_path / "first", tmp_path / "second"
  assert suite.main(common + ["--out", str(first)]) == 0
  assert suite.main(common + ["--out", str(second), "--adam-from", str(first)]) == 0
  assert sorted(p.name for p in (second / "runs" / "digits_mlp").iterdir()) == [
      f"mine_seed{protocol.FIRST_SEED + i}.json" for i in range(2)]
  without_timing = lambda m: {k: v for k, v in m.items() if k != "adam_step_ms"} | {
      "optimizers": {label: {**o, "step_cost_ratio": None,
                             "horizons": {h: {k: v for k, v in r.items()
                                              if k != "wall_clock_fraction"}
                                          for h, r in o["horizons"].items()}}
                     for label, o in m["optimizers"].items()}}
  ours, theirs = (suite.read_results(d) for d in (second, first))
  assert without_timing(ours["models"][0]) == without_timing(theirs["models"][0])
  assert ours["adam_from"] == str(first)
  # Another protocol, or a model the earlier output lacks, is refused before any run.
  three_seeds = common[:common.index("--seeds") + 1] + ["3"] + common[common.index("--seeds") + 2:]
  with pytest.raises(ValueError, match=r"protocol differs .*\['seeds'\]"):
    suite.main(three_seeds + ["--out", str(tmp_path / "third"), "--adam-from", str(first)])
  with pytest.raises(ValueError, match=r"no summary of \['softmax_regression_b512'\]"):
    suite.main([a if a != "digits_mlp" else "softmax_regression_b512" for a in common]
               + ["--out", str(tmp_path / "third"), "--adam-from", str(first)])
  assert not (tmp_path / "third").exists()


def test_suite_step_cost_benchmark_reports_each_model_against_the_target(cifar_dir, tmp_path):
  from benchmarks import suite_step_cost  # noqa: PLC0415
  out = tmp_path / "cost.json"
  rc = suite_step_cost.main(["--models", "softmax_regression_b512,digits_mlp", "--reps", "3",
                             "--data-dir", cifar_dir, "--out", str(out)])
  ratios = json.loads(out.read_text())["ratios"]
  assert set(ratios) == {"softmax_regression_b512", "digits_mlp"}
  assert all(r["cifar"] > 0 and r["adam"] == 1.0 for r in ratios.values())
  # Only the CIFAR-10 model counts against the target.
  assert rc == int(ratios["softmax_regression_b512"]["cifar"] > suite_step_cost.TARGET)
