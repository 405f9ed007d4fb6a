"""The compute-quality plot of benchmarks/select_checkpoint.py (no training)."""

import json

import pytest

from benchmarks import select_checkpoint


def _results(valids):
  return {"task": "cifar_conv_32", "steps": 1000, "seeds": 2,
          "adam": {"learning_rate": 3.16e-3, "train": 1.3, "valid": 1.41},
          "checkpoints": [{"path": f"s{i}", "meta_steps": 100 * i, "hours": 0.1 * i,
                           "train": v - 0.05, "valid": v, "steps": None}
                          for i, v in enumerate(valids, start=1)]}


def test_plot_from_earlier_scores_draws_every_run(tmp_path):
  for name, valids in (("a", [1.35, 1.34, 1.40]), ("b", [1.36, 1.33])):
    (tmp_path / f"{name}.json").write_text(json.dumps(_results(valids)))
  out = tmp_path / "curve.png"
  assert select_checkpoint.main(["--plot-from", f"a={tmp_path / 'a.json'}",
                                 f"b={tmp_path / 'b.json'}", "--plot", str(out)]) == 0
  assert out.stat().st_size > 10_000
  with pytest.raises(SystemExit):
    select_checkpoint.main(["--plot-from", f"a={tmp_path / 'a.json'}"])  # no --plot


def test_wall_hours_come_from_the_run_metrics(tmp_path, monkeypatch):
  monkeypatch.setattr(select_checkpoint.optax_learned, "load_metadata",
                      lambda path: {"summary": {"meta_steps": 200, "wall_time_seconds": None}})
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("".join(json.dumps({"step": s, "wall_time": 36.0 * s}) + "\n"
                             for s in (100, 200, 300)))
  assert select_checkpoint.meta_training_hours("x", metrics) == (200, 2.0)
  assert select_checkpoint.meta_training_hours("x", None) == (200, None)
