"""Meta-training runs: resume, kill safety, faults, determinism and sharding."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_learned
from metatrain import configs, estimators
from metatrain import trainer as trainer_lib

SHORT = configs.get_config("quadratic").with_overrides(
    ["steps=12", "log_every=2", "checkpoint_every=4"])


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_bit_identical(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The final state of an uninterrupted SHORT run."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  state = trainer_lib.MetaTrainer(SHORT, workdir, progress=False).train()
  return workdir, jax.device_get(state)


def test_run_writes_metrics_checkpoints_and_plot(uninterrupted):
  workdir, state = uninterrupted
  records = _records(workdir)
  assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
  for key in ("meta_loss", "grad_norm", "es_variance", "wall_time", "total_skipped_nonfinite",
              "total_divergences"):
    assert key in records[-1], key
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]
  assert (workdir / "metrics.png").stat().st_size > 0
  assert int(state["step"]) == 12


def test_same_seed_is_bit_identical(uninterrupted, tmp_path):
  _, state = uninterrupted
  again = trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False).train()
  _assert_bit_identical(state["meta_params"], again["meta_params"])
  assert [r["meta_loss"] for r in _records(tmp_path)] == [
      r["meta_loss"] for r in _records(uninterrupted[0])]


def test_resume_matches_uninterrupted_run(uninterrupted, tmp_path):
  trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False).train(steps=6)  # saves 4 and 6
  # Simulate losing the work after step 4: step 6's checkpoint is gone, its metrics are not.
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  assert [r["step"] for r in _records(tmp_path)] == [2, 4, 6]
  runner = trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False)
  assert runner.checkpoint_manager().latest_step() == 4
  state = runner.train()
  _assert_bit_identical(uninterrupted[1]["meta_params"], state["meta_params"])
  assert [r["step"] for r in _records(tmp_path)] == [2, 4, 6, 8, 10, 12]


def test_noise_reuse_es_resumes_bit_identical(tmp_path):
  # Its state (perturbations kept across truncations, the redraw mask) is checkpointed too.
  config = SHORT.with_overrides(["estimator.name=nres", "steps=8"])
  whole = trainer_lib.MetaTrainer(config, tmp_path / "whole", progress=False).train()
  trainer_lib.MetaTrainer(config, tmp_path / "parts", progress=False).train(steps=4)
  resumed = trainer_lib.MetaTrainer(config, tmp_path / "parts", progress=False).train()
  _assert_bit_identical(jax.device_get(whole), jax.device_get(resumed))
  assert isinstance(jax.device_get(resumed).estimator_states[0].es,
                    estimators.NoiseReuseESState)


def test_resume_with_a_different_config_is_refused(tmp_path):
  trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False).train(steps=4)
  other = SHORT.with_overrides(["estimator.sigma=0.5"])
  with pytest.raises(trainer_lib.WorkdirError,
                     match=r"estimator.sigma: stored 0.01, requested 0.5"):
    trainer_lib.MetaTrainer(other, tmp_path, progress=False).train()
  # Run-control keys may change on resume.
  longer = SHORT.with_overrides(["steps=6", "log_every=3"])
  assert int(trainer_lib.MetaTrainer(longer, tmp_path, progress=False).train()["step"]) == 6


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(trainer_lib.WorkdirError, match="cannot write to the work directory"):
    trainer_lib.MetaTrainer(SHORT, blocker / "run", progress=False).train()


def test_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
  runner = trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False)
  runner.train(steps=4)
  import orbax.checkpoint as ocp
  def no_space(self, step, *args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
  with pytest.raises(trainer_lib.WorkdirError, match="No space left.*last complete checkpoint"):
    trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False).train(steps=8)
  monkeypatch.undo()
  manager = trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False).checkpoint_manager()
  assert manager.latest_step() == 4


def test_nonfinite_meta_gradients_are_skipped_and_counted(tmp_path):
  runner = trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False)
  estimator = runner.estimators[0]

  class PoisonOnStep3:
    init = estimator.init

    def estimate(self, meta_params, state, key, data, num_segments=1):
      gradient, state, diagnostics = estimator.estimate(meta_params, state, key, data,
                                                        num_segments)
      poison = jnp.all(key == jax.random.fold_in(jax.random.PRNGKey(SHORT.seed), 3))
      gradient = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), gradient)
      return gradient, state, diagnostics

  runner.estimators[0] = PoisonOnStep3()
  before = jax.device_get(runner.train(steps=3)["meta_params"])
  after = runner.train(steps=4)
  _assert_bit_identical(before, after["meta_params"])
  assert int(after["counters"]["skipped_nonfinite"]) == 1
  assert _records(tmp_path)[-1]["total_skipped_nonfinite"] == 1


def test_diverging_inner_runs_are_reset_and_counted(tmp_path):
  config = SHORT.with_overrides(["truncation.divergence_loss=1e-9", "steps=4"])
  state = trainer_lib.MetaTrainer(config, tmp_path, progress=False).train()
  particles = config.estimator.num_particles
  assert float(state["counters"]["divergences"]) == 4 * particles
  # Every truncation after the first starts with a reset of every run.
  assert float(state["counters"]["resets"]) >= 3 * particles


# A shell without job control starts background commands with SIGINT ignored, and Python
# then installs no KeyboardInterrupt handler: a test run in the background would otherwise
# send Ctrl-C to a child that cannot receive it. The prelude restores what a terminal gives.
_AS_IN_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
                     "signal.default_int_handler); sys.argv[0] = 'metatrain'; "
                     "runpy.run_module('metatrain', run_name='__main__', alter_sys=True)")


def _train_subprocess(workdir, steps, extra_env=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(extra_env or {})}
  args = [sys.executable, "-c", _AS_IN_A_TERMINAL, "train", "--config", "quadratic",
          "--workdir", str(workdir), "--steps", str(steps), "--progress", "lines",
          "--set", "log_every=1", "--set", "checkpoint_every=2"]
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _final_meta_params(workdir):
  manager = trainer_lib.MetaTrainer(
      configs.get_config("quadratic").with_overrides(["log_every=1", "checkpoint_every=2"]),
      workdir, progress=False).checkpoint_manager()
  import orbax.checkpoint as ocp
  restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  return manager.latest_step(), restored["meta_params"]


def _kill_after_lines(workdir, steps, lines):
  """Starts a run and SIGKILLs it once it printed ``lines`` metrics lines."""
  process = _train_subprocess(workdir, steps)
  seen = 0
  for line in process.stdout:
    seen += line.startswith("step ")
    if seen >= lines:
      process.send_signal(signal.SIGKILL)
      break
  process.wait(timeout=120)
  return process.returncode


@pytest.mark.parametrize("kill_after", [3])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, kill_after):
  reference = tmp_path / "reference"
  assert _train_subprocess(reference, 8).wait(timeout=300) == 0
  killed = tmp_path / "killed"
  assert _kill_after_lines(killed, 8, kill_after) == -signal.SIGKILL
  assert _train_subprocess(killed, 8).wait(timeout=300) == 0
  step_a, params_a = _final_meta_params(reference)
  step_b, params_b = _final_meta_params(killed)
  assert step_a == step_b == 8
  _assert_bit_identical(params_a, params_b)


@pytest.mark.slow
def test_sigkill_at_many_moments_including_checkpoint_writes(tmp_path):
  reference = tmp_path / "reference"
  assert _train_subprocess(reference, 12).wait(timeout=300) == 0
  _, expected = _final_meta_params(reference)
  workdir = tmp_path / "killed"
  rng = np.random.default_rng(0)
  for _ in range(4):
    process = _train_subprocess(workdir, 12)
    # Kill at a random moment, often in the middle of an asynchronous checkpoint write.
    time.sleep(float(rng.uniform(4.0, 12.0)))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=120)
  assert _train_subprocess(workdir, 12).wait(timeout=300) == 0
  step, params = _final_meta_params(workdir)
  assert step == 12
  _assert_bit_identical(expected, params)


def test_sharded_run_matches_single_device(tmp_path):
  script = (
      "import sys, json, jax, numpy as np\n"
      "from metatrain import configs, trainer\n"
      "c = configs.get_config('quadratic').with_overrides(['steps=4', 'checkpoint_every=4'])\n"
      "s = trainer.MetaTrainer(c, sys.argv[1], progress=False).train()\n"
      "assert len(jax.devices()) == int(sys.argv[2]), jax.devices()\n"
      "print(json.dumps([np.asarray(x).ravel().tolist() for x in "
      "jax.tree.leaves(s['meta_params'])]))\n")
  outputs = []
  for devices in (1, 4):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / str(devices)),
                             str(devices)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs.append(json.loads(result.stdout.strip().splitlines()[-1]))
  for one, four in zip(*outputs, strict=True):
    np.testing.assert_allclose(one, four, rtol=1e-4, atol=1e-6)


def test_init_from_an_exported_optimizer(uninterrupted, tmp_path):
  workdir, state = uninterrupted
  exported = trainer_lib.export(workdir, tmp_path / "exported")
  config = SHORT.with_overrides([f"init_from={exported}", "steps=1"])
  runner = trainer_lib.MetaTrainer(config, tmp_path / "warm", progress=False)
  _assert_bit_identical(state["meta_params"], runner.init_state()["meta_params"])
  mismatched = config.with_overrides(["optimizer.hidden_sizes=[4]"])
  with pytest.raises(ValueError, match="holds an optimizer with config"):
    trainer_lib.MetaTrainer(mismatched, tmp_path / "bad", progress=False).init_state()


def test_export_and_evaluate_after_a_four_device_run_on_one_device(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  subprocess.run([sys.executable, "-m", "metatrain", "train", "--config", "quadratic",
                  "--workdir", str(workdir), "--steps", "4", "--set", "checkpoint_every=4",
                  "--progress", "lines"], env=env, check=True, capture_output=True, timeout=300)
  # This process has one device: export restores onto it, and the result loads and updates.
  assert len(jax.devices()) == 1
  exported = trainer_lib.export(workdir, tmp_path / "exported")
  assert oct((exported / "optimizer.json").stat().st_mode & 0o777) == "0o644"
  tx = optax_learned.load(exported)
  params = {"w": jnp.ones((3, 2))}
  updates, _ = tx.update(params, tx.init(params), params)
  assert np.all(np.isfinite(updates["w"]))


def test_a_second_writer_fails_at_once_and_a_killed_runs_lock_does_not_block(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with trainer_lib.workdir_lock(workdir):
    with pytest.raises(trainer_lib.WorkdirError, match=rf"in use by another .*PID {os.getpid()}"):
      with trainer_lib.workdir_lock(workdir):
        pass
  # A process that took the lock and was killed leaves the file, but not the lock.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import pathlib, sys, time\n"
       "from metatrain import trainer\n"
       "with trainer.workdir_lock(pathlib.Path(sys.argv[1])):\n"
       "  print('locked', flush=True); time.sleep(60)\n", str(workdir)],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(trainer_lib.WorkdirError, match=f"PID {holder.pid}"):
    with trainer_lib.workdir_lock(workdir):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=60)
  assert (workdir / trainer_lib.LOCK_FILE).exists()
  with trainer_lib.workdir_lock(workdir):
    pass


def test_ctrl_c_prints_one_line_exits_130_and_the_rerun_says_it_resumes(tmp_path):
  workdir = tmp_path / "run"
  process = _train_subprocess(workdir, 1_000_000)  # far more than it can finish
  for line in process.stdout:
    if line.startswith("step 3/"):
      process.send_signal(signal.SIGINT)
      break
  rest = process.stdout.read()
  assert process.wait(timeout=120) == 130
  errors = [line for line in rest.splitlines() if not line.startswith("step ")]
  assert len(errors) == 1 and "rerun the same command to resume" in errors[0], rest
  assert "Traceback" not in rest
  rerun = _train_subprocess(workdir, 6)
  output = rerun.stdout.read()
  assert rerun.wait(timeout=300) == 0
  assert re.search(r"resuming from step \d+", output), output


def test_a_ctrl_c_inside_a_checkpoint_save_lets_the_save_finish(tmp_path, monkeypatch):
  """The race behind a flaky Ctrl-C: SIGINT arriving while Orbax starts its save threads."""
  import orbax.checkpoint as ocp
  real_save = ocp.CheckpointManager.save

  def save_hit_by_ctrl_c(manager, step, *args, **kwargs):
    signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C as the save begins
    return real_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save_hit_by_ctrl_c)
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(trainer_lib.Interrupted, match="last checkpoint is step 4"):
      trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False).train()
    # The deferral put back the handler it found (checked before the finally restores ours).
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_two_processes_match_one_process_with_two_devices(tmp_path):
  """``--coordinator/--num-processes/--process-id`` over CPU collectives (gloo)."""
  base = [sys.executable, "-m", "metatrain", "train", "--config", "quadratic", "--steps", "4",
          "--set", "checkpoint_every=4", "--progress", "lines"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  processes = [subprocess.Popen(
      base + ["--workdir", str(tmp_path / "two"), "--coordinator", f"localhost:{port}",
              "--num-processes", "2", "--process-id", str(i)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  single_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  subprocess.run(base + ["--workdir", str(tmp_path / "one")], env=single_env, check=True,
                 capture_output=True, timeout=300)
  two = optax_learned.load_weights(trainer_lib.export(tmp_path / "two", tmp_path / "e2"))[1]
  one = optax_learned.load_weights(trainer_lib.export(tmp_path / "one", tmp_path / "e1"))[1]
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_runs_of_the_earlier_layout_resume(uninterrupted, tmp_path):
  """A work directory from before the config sections and the typed state: a flat
  config.json, and PES's runs beside ``positive`` in plain dicts. It resumes where it was."""
  import orbax.checkpoint as ocp
  from test_configs import legacy_dict
  state = trainer_lib.MetaTrainer(SHORT, tmp_path / "new", progress=False).train(steps=4)
  earlier = {
      "step": state.step, "meta_params": state.meta_params,
      "meta_opt_state": state.meta_opt_state, "counters": dict(state.counters),
      "estimator_states": [{"positive": s.positive, "negative": s.es.negative,
                            "accumulated": s.es.accumulated} for s in state.estimator_states],
  }
  old = tmp_path / "old"
  manager = ocp.CheckpointManager(old / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(4, args=ocp.args.StandardSave(earlier))
  manager.wait_until_finished()
  (old / "config.json").write_text(json.dumps(legacy_dict(SHORT)))
  shutil.copy(tmp_path / "new" / "metrics.jsonl", old / "metrics.jsonl")

  resumed = trainer_lib.MetaTrainer(SHORT, old, progress=False).train()
  _assert_bit_identical(uninterrupted[1].meta_params, resumed.meta_params)
  assert json.loads((old / "config.json").read_text())["truncation"]["length"] == 5


def test_a_checkpoint_of_another_state_is_named(tmp_path):
  trainer_lib.MetaTrainer(SHORT, tmp_path, progress=False).train(steps=4)
  wider = SHORT.with_overrides(["optimizer.hidden_sizes=[4]"])
  runner = trainer_lib.MetaTrainer(wider, tmp_path / "unused", progress=False)
  with pytest.raises(trainer_lib.WorkdirError,
                     match=r"checkpoint 4 in .* does not hold this run's state: \S*/b is "
                           r"float32\[4, 8\], this run expects float32\[4, 4\]"):
    runner.restore_or_init(trainer_lib.MetaTrainer(SHORT, tmp_path,
                                                   progress=False).checkpoint_manager())
