"""The metatrain command line, end to end on the quadratic config."""

import json

import jax
import numpy as np
import pytest

import optax_learned
from metatrain import cli


def test_list_prints_configs_and_tasks(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  for name in ("quadratic", "digits", "cifar", "linear_regression", "digits_mlp",
               "cifar_conv_32"):
    assert name in out


@pytest.mark.parametrize("command", ["train", "export", "evaluate", "diagnose", "list"])
def test_every_command_explains_every_option(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([command, "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  parser = cli.build_parser()
  subparser = parser._subparsers._group_actions[0].choices[command]  # pylint: disable=protected-access
  for action in subparser._actions:  # pylint: disable=protected-access
    if action.option_strings and action.dest != "help":
      assert action.help, f"{command} {action.option_strings} has no help"
      assert action.option_strings[-1] in out


def test_train_export_load(tmp_path, capsys):
  workdir, out = tmp_path / "run", tmp_path / "exported"
  assert cli.main(["train", "--config", "quadratic", "--workdir", str(workdir),
                   "--steps", "4", "--set", "checkpoint_every=2", "--progress", "lines"]) == 0
  assert "meta-trained to step 4" in capsys.readouterr().out
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["step"] == 4
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
  metadata = optax_learned.load_metadata(out)
  assert metadata["summary"]["meta_steps"] == 4
  assert metadata["training_config"]["estimator"]["name"] == "pes"
  lopt, meta_params = optax_learned.load_weights(out)
  assert lopt.hidden_sizes == (8,)
  tx = optax_learned.load(out)
  params = {"w": jax.numpy.ones(3)}
  updates, _ = tx.update(params, tx.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
  assert cli.main(["train", "--config", "quadratic", "--workdir", str(tmp_path),
                   "--set", "no_such_key=1"]) == 2
  assert "unknown config key 'no_such_key'" in capsys.readouterr().err
  assert cli.main(["train", "--config", "quadratic", "--workdir", str(tmp_path),
                   "--set", "estimator.name=sgd"]) == 2
  assert "estimator.name must be one of" in capsys.readouterr().err
  assert cli.main(["export", "--workdir", str(tmp_path / "none"), "--out",
                   str(tmp_path / "x")]) == 2
  assert "not a meta-training work directory" in capsys.readouterr().err


def test_evaluate_replaces_task_fields(tmp_path, capsys):
  out = tmp_path / "eval"
  assert cli.main(["evaluate", "--task", "linear_regression", "--steps", "4", "--seeds", "1",
                   "--baselines", "adam", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                   "--task-set", "batch_size=8", "--task-set", "noise=0.5"]) == 0
  results = json.loads((out / "results.json").read_text())
  assert results["task"]["overrides"] == {"batch_size": 8, "noise": 0.5}
  capsys.readouterr()
  assert cli.main(["evaluate", "--task", "linear_regression", "--out", str(out),
                   "--task-set", "batch_size"]) == 2
  assert "--task-set expects FIELD=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--num-processes", "2"], "need --coordinator"),
    (["--coordinator", "localhost:1234"], "needs --num-processes N and --process-id I"),
])
def test_distributed_flags_must_come_together(tmp_path, capsys, flags, message):
  assert cli.main(["train", "--config", "quadratic", "--workdir", str(tmp_path)] + flags) == 2
  assert message in capsys.readouterr().err


def test_diagnose_takes_lengths_samples_slice_and_task(tmp_path, capsys):
  out = tmp_path / "diag"
  assert cli.main(["diagnose", "--config", "quadratic", "--out", str(out), "--lengths", "4,2",
                   "--num-samples", "2", "--slice-points", "3", "--task", "linear_regression",
                   "--task-set", "dim=4", "--set", "estimator.name=merged"]) == 0
  report = json.loads((out / "diagnostics.json").read_text())
  assert report["lengths"] == [2, 4]
  assert report["task"] == "linear_regression_d4"  # --task with --task-set dim=4
  assert len(report["slice"]["alphas"]) == 3
  assert len(report["es_weight"]) == 2
  with pytest.raises(SystemExit):
    cli.main(["diagnose", "--config", "quadratic", "--out", str(out), "--lengths", "0,2"])
  assert "expected comma-separated positive integers, got '0,2'" in capsys.readouterr().err
  assert cli.main(["diagnose", "--config", "quadratic", "--out", str(out),
                   "--task-set", "batch_size=16"]) == 2
  assert "--task-set needs --task" in capsys.readouterr().err
