"""Tests of learned optimizer checkpoints: round trips, bundled names and every bad input."""

import dataclasses
import json
import pathlib
import re
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import optax_learned
from optax_learned._src import checkpoint

_LOPT = optax_learned.LearnedOptimizer(hidden_sizes=(6, 5), beta1=0.8, time_scales=(10.0, 100.0),
                                       matrix_step=0.25, output_init_scale=0.5)
# Each load must finish well within this (a hang would otherwise stall the suite).
_TIMEOUT_S = 20.0


def _meta_params(lopt=_LOPT, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda spec: jnp.asarray(rng.normal(size=spec.shape), jnp.float32),
                      lopt.meta_params_shapes())


def _call(fn: Callable[..., Any], *args) -> Any:
  """Calls ``fn`` in a daemon thread, failing the test if it does not finish in time."""
  result = {}

  def target():
    try:
      result["value"] = fn(*args)
    except BaseException as e:  # pylint: disable=broad-except
      result["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  start = time.monotonic()
  thread.start()
  thread.join(_TIMEOUT_S)
  assert not thread.is_alive(), f"{fn.__name__}{args} hung for {_TIMEOUT_S} s"
  assert time.monotonic() - start < _TIMEOUT_S
  if "error" in result:
    raise result["error"]
  return result["value"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
  """A pristine checkpoint; tests copy it before damaging it."""
  path = tmp_path_factory.mktemp("saved") / "ckpt"
  optax_learned.save(path, _LOPT, _meta_params(),
                     metadata={"description": "a test optimizer", "steps": 3})
  return path


@pytest.fixture
def copy(saved, tmp_path) -> pathlib.Path:
  destination = tmp_path / "ckpt"
  shutil.copytree(saved, destination)
  return destination


def _edit_config(path: pathlib.Path, edit: Callable[[dict], Any]) -> None:
  config_file = path / "optimizer.json"
  config = json.loads(config_file.read_text())
  edit(config)
  config_file.write_text(json.dumps(config))


def _assert_trees_bit_equal(a, b):
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(a)
  b_leaves, b_def = jax.tree_util.tree_flatten_with_path(b)
  assert a_def == b_def
  for (key, x), (_, y) in zip(a_leaves, b_leaves, strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, key
    np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32), err_msg=str(key))


# -- round trips -----------------------------------------------------------------------------


def test_round_trip_is_bit_exact(saved):
  lopt, meta_params = _call(optax_learned.load_weights, saved)
  assert lopt == _LOPT and lopt.to_dict() == _LOPT.to_dict()
  _assert_trees_bit_equal(meta_params, _meta_params())
  assert optax_learned.load_metadata(saved) == {"description": "a test optimizer", "steps": 3}
  config = json.loads((saved / "optimizer.json").read_text())
  assert config["format_version"] == optax_learned.FORMAT_VERSION == 4
  assert config["package_version"] == optax_learned.__version__


def test_anneal_steps_round_trips_and_the_bundled_cifar_has_its_decay(tmp_path):
  lopt = dataclasses.replace(_LOPT, anneal_steps=500)
  optax_learned.save(tmp_path / "annealing", lopt, _meta_params())
  assert _call(optax_learned.load_weights, tmp_path / "annealing")[0].anneal_steps == 500.0
  assert _call(optax_learned.load_weights, "cifar")[0].anneal_steps == 1000.0
  assert _call(optax_learned.load_weights, "digits")[0].anneal_steps is None


def test_load_returns_a_working_transformation(saved):
  tx = _call(optax_learned.load, str(saved))
  reference = _LOPT.transform(_meta_params())
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: 0.1 * p + 0.05, params)
  got = jax.jit(tx.update)(grads, tx.init(params), params)
  expected = jax.jit(reference.update)(grads, reference.init(params), params)
  _assert_trees_bit_equal(got, expected)
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(got[0]))
  # The learning-rate multiplier reaches the transformation: 0.5 halves every step exactly.
  half = _call(optax_learned.load, saved, 0.5)
  halved, state = jax.jit(half.update)(grads, half.init(params), params)
  _assert_trees_bit_equal(halved, jax.tree.map(lambda u: 0.5 * u, got[0]))
  _assert_trees_bit_equal(state, got[1])


def test_save_refuses_to_overwrite_unless_asked(saved, copy, tmp_path):
  with pytest.raises(FileExistsError, match="overwrite=True"):
    optax_learned.save(copy, _LOPT, _meta_params())
  other = optax_learned.LearnedOptimizer(hidden_sizes=(3,))
  optax_learned.save(copy, other, _meta_params(other, seed=1), overwrite=True)
  lopt, meta_params = _call(optax_learned.load_weights, copy)
  assert lopt == other
  _assert_trees_bit_equal(meta_params, _meta_params(other, seed=1))
  not_a_checkpoint = tmp_path / "precious"
  not_a_checkpoint.mkdir()
  (not_a_checkpoint / "data.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a learned optimizer checkpoint"):
    optax_learned.save(not_a_checkpoint, _LOPT, _meta_params(), overwrite=True)
  assert (not_a_checkpoint / "data.txt").read_text() == "keep me"


def test_save_refuses_bad_weights_and_metadata(tmp_path):
  wrong_shapes = _meta_params(optax_learned.LearnedOptimizer(hidden_sizes=(3,)))
  with pytest.raises(optax_learned.CheckpointArraysError, match=r"missing.*layer_2|shape"):
    optax_learned.save(tmp_path / "a", _LOPT, wrong_shapes)
  nonfinite = _meta_params()
  nonfinite["log_base_step"] = nonfinite["log_base_step"].at[0].set(jnp.nan)
  with pytest.raises(optax_learned.CheckpointArraysError,
                     match=r"\['log_base_step'\].*non-finite"):
    optax_learned.save(tmp_path / "b", _LOPT, nonfinite)
  with pytest.raises(TypeError, match="JSON-serialisable"):
    optax_learned.save(tmp_path / "c", _LOPT, _meta_params(), metadata={"f": object()})
  assert not any(tmp_path.iterdir())


# -- bundled optimizers ----------------------------------------------------------------------


def test_available_is_empty_without_bundled_checkpoints(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint, "bundled_root", lambda: tmp_path)
  assert optax_learned.available() == {}
  monkeypatch.setattr(checkpoint, "bundled_root", lambda: tmp_path / "absent")
  assert optax_learned.available() == {}


def test_available_lists_exactly_the_bundled_checkpoints():
  root = checkpoint.bundled_root()
  on_disk = sorted(p.parent.name for p in root.glob("*/optimizer.json")) if root.is_dir() else []
  assert sorted(optax_learned.available()) == on_disk


@pytest.mark.parametrize("name", sorted(optax_learned.available()))
def test_bundled_checkpoint_loads_and_updates(name):
  lopt, meta_params = _call(optax_learned.load_weights, name)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(meta_params))
  assert optax_learned.available()[name] == optax_learned.load_metadata(name)["description"]
  tx = optax_learned.load(name)
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
  grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.1, params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert int(state.count) == 1 and lopt.to_dict()["hidden_sizes"]
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


def test_available_lists_a_bundled_checkpoint(saved, tmp_path, monkeypatch):
  shutil.copytree(saved, tmp_path / "tiny")
  (tmp_path / "not_a_checkpoint").mkdir()
  (tmp_path / "README.md").write_text("bundled learned optimizers")
  monkeypatch.setattr(checkpoint, "bundled_root", lambda: tmp_path)
  assert optax_learned.available() == {"tiny": "a test optimizer"}
  lopt, meta_params = _call(optax_learned.load_weights, "tiny")
  assert lopt == _LOPT
  _assert_trees_bit_equal(meta_params, _meta_params())
  assert optax_learned.load_metadata("tiny")["steps"] == 3


def test_unknown_bundled_name_lists_available_names(saved, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  expected = re.escape(str(sorted(optax_learned.available())) if optax_learned.available()
                       else "none yet")
  with pytest.raises(optax_learned.UnknownOptimizerError,
                     match=r"'no_such_optimizer'.*" + expected):
    optax_learned.load("no_such_optimizer")
  monkeypatch.setattr(checkpoint, "bundled_root", lambda: tmp_path / "empty")
  with pytest.raises(optax_learned.UnknownOptimizerError, match=r"'cifar'.*none yet"):
    optax_learned.load("cifar")
  shutil.copytree(saved, tmp_path / "tiny")
  monkeypatch.setattr(checkpoint, "bundled_root", lambda: tmp_path)
  with pytest.raises(optax_learned.UnknownOptimizerError, match=r"'cifar'.*\['tiny'\]"):
    optax_learned.load("cifar")
  with pytest.raises(optax_learned.CheckpointError):  # the family catches it too
    optax_learned.load_weights("cifar")


@pytest.mark.parametrize("name", ["../x", "..", ".", "", "a/b", "/etc", "..\\x", ".hidden",
                                  "x\x00"])
def test_bundled_name_resolver_refuses_names_that_are_not_plain(name):
  with pytest.raises(optax_learned.UnknownOptimizerError, match="not a valid bundled"):
    checkpoint._bundled_dir(name)  # pylint: disable=protected-access


def test_load_of_a_name_escaping_the_bundled_folder_is_not_found(saved, tmp_path, monkeypatch):
  """'../x' is a path relative to the working directory, never a name under the bundled root.

  A real checkpoint sits at ``<bundled root>/../x``; from the working directory ``../x``
  does not exist, so loading it must fail as not found rather than escape the root.
  """
  monkeypatch.setattr(checkpoint, "bundled_root", lambda: tmp_path / "checkpoints")
  (tmp_path / "checkpoints").mkdir()
  shutil.copytree(saved, tmp_path / "x")
  (tmp_path / "work" / "here").mkdir(parents=True)
  monkeypatch.chdir(tmp_path / "work" / "here")
  with pytest.raises(optax_learned.CheckpointNotFoundError,
                     match=r"no checkpoint directory at \.\./x"):
    _call(optax_learned.load, "../x")
  with pytest.raises(FileNotFoundError):  # also a built-in FileNotFoundError
    optax_learned.load_weights("../x")
  with pytest.raises(optax_learned.UnknownOptimizerError, match="may not point outside"):
    checkpoint._bundled_dir("../x")  # pylint: disable=protected-access


# -- missing and malformed checkpoints -------------------------------------------------------


def test_missing_directory(tmp_path):
  with pytest.raises(optax_learned.CheckpointNotFoundError, match="no checkpoint directory"):
    _call(optax_learned.load, tmp_path / "nowhere")
  with pytest.raises(optax_learned.CheckpointNotFoundError, match="no checkpoint directory"):
    optax_learned.load_metadata(tmp_path / "nowhere")


def test_directory_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / "weights").mkdir()
  with pytest.raises(optax_learned.CheckpointNotFoundError,
                     match="not a learned optimizer checkpoint: it has no optimizer.json"):
    _call(optax_learned.load, tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read the config"),
    ("", "cannot read the config"),
    ("\xff\xfe garbage", "cannot read the config"),
    ("[1, 2]", "must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "cannot read the config"),
    ('{"format_version": 2, "optimizer": {}, "x": ' + "9" * 5000 + "}", "cannot read"),
])
def test_malformed_config(copy, text, message):
  (copy / "optimizer.json").write_bytes(text.encode("latin-1"))
  with pytest.raises(optax_learned.CheckpointConfigError, match=message):
    _call(optax_learned.load_weights, copy)


@pytest.mark.parametrize("edit, error, message", [
    (lambda c: c.pop("optimizer"), optax_learned.CheckpointConfigError,
     r"missing key\(s\) \['optimizer'\]"),
    (lambda c: c.pop("format_version"), optax_learned.CheckpointConfigError,
     r"missing key\(s\) \['format_version'\]"),
    (lambda c: c.update(weights_sha="0"), optax_learned.CheckpointConfigError,
     r"unknown key\(s\) \['weights_sha'\]"),
    (lambda c: c.update(format_version=optax_learned.FORMAT_VERSION + 1),
     optax_learned.CheckpointVersionError,
     rf"format version {optax_learned.FORMAT_VERSION + 1} is newer.*upgrade"),
    (lambda c: c.update(format_version="1"), optax_learned.CheckpointConfigError,
     "format_version must be a positive integer"),
    (lambda c: c.update(format_version=True), optax_learned.CheckpointConfigError,
     "format_version must be a positive integer"),
    (lambda c: c.update(format_version=0), optax_learned.CheckpointConfigError,
     "format_version must be a positive integer"),
    (lambda c: c.update(metadata=[1]), optax_learned.CheckpointConfigError,
     "metadata must be a JSON object"),
    (lambda c: c.update(optimizer=[1]), optax_learned.CheckpointConfigError,
     "invalid optimizer config: it must be a JSON object"),
    (lambda c: c["optimizer"].pop("matrix_step"), optax_learned.CheckpointConfigError,
     r"missing field\(s\) \['matrix_step'\]"),
    (lambda c: c["optimizer"].update(step_mult=0.1), optax_learned.CheckpointConfigError,
     r"unknown optimizer config keys \['step_mult'\]"),
    (lambda c: c["optimizer"].update(learning_rate=1.0), optax_learned.CheckpointConfigError,
     r"unknown optimizer config keys \['learning_rate'\]"),
    (lambda c: c["optimizer"].update(hidden_sizes=[-1]), optax_learned.CheckpointConfigError,
     "hidden_sizes must be positive"),
    (lambda c: c["optimizer"].update(hidden_sizes="32"), optax_learned.CheckpointConfigError,
     "hidden_sizes must be a sequence of int"),
    (lambda c: c["optimizer"].update(activation="swish"), optax_learned.CheckpointConfigError,
     "activation must be one of"),
    (lambda c: c["optimizer"].update(matrix_step=None), optax_learned.CheckpointConfigError,
     "matrix_step must be a finite number"),
    (lambda c: c["optimizer"].update(beta1=1.5), optax_learned.CheckpointConfigError,
     r"beta1 must lie in \[0, 1\)"),
    (lambda c: c["optimizer"].update(initial_gradient_mix=0), optax_learned.CheckpointConfigError,
     r"initial_gradient_mix must lie in \(0, 1\)"),
    (lambda c: c["optimizer"].update(anneal_steps=0), optax_learned.CheckpointConfigError,
     "anneal_steps must be a positive number"),
    (lambda c: c["optimizer"].update(skip_nonfinite="yes"), optax_learned.CheckpointConfigError,
     "skip_nonfinite must be a bool"),
])
def test_invalid_config(copy, edit, error, message):
  _edit_config(copy, edit)
  with pytest.raises(error, match=message):
    _call(optax_learned.load_weights, copy)
  with pytest.raises(optax_learned.CheckpointError):
    optax_learned.load(copy)


def test_version_2_checkpoint_loads_without_the_decays_it_predates(copy):
  """Format 2 has no ``anneal_steps`` or ``weight_decay``: it loads as it was trained."""
  def as_version_2(config):
    config.update(format_version=2)
    config["optimizer"].pop("anneal_steps")
    config["optimizer"].pop("weight_decay")
  _edit_config(copy, as_version_2)
  lopt, _ = _call(optax_learned.load_weights, copy)
  assert lopt.anneal_steps is None and lopt.weight_decay == 0.0
  # Format 3 must name the field it has.
  _edit_config(copy, lambda c: c.update(format_version=3))
  missing = r"missing field\(s\) \['anneal_steps'\]"
  with pytest.raises(optax_learned.CheckpointConfigError, match=missing):
    _call(optax_learned.load_weights, copy)


def test_version_3_checkpoint_loads_without_weight_decay(copy):
  """Format 3 predates ``weight_decay``: it loads with none; format 4 must name it."""
  _edit_config(copy, lambda c: c["optimizer"].update(anneal_steps=500.0, weight_decay=0.1))
  assert _call(optax_learned.load_weights, copy)[0].weight_decay == 0.1
  def as_version_3(config):
    config.update(format_version=3)
    config["optimizer"].pop("weight_decay")
  _edit_config(copy, as_version_3)
  lopt, _ = _call(optax_learned.load_weights, copy)
  assert lopt.weight_decay == 0.0 and lopt.anneal_steps == 500.0
  _edit_config(copy, lambda c: c.update(format_version=4))
  with pytest.raises(optax_learned.CheckpointConfigError,
                     match=r"missing field\(s\) \['weight_decay'\]"):
    _call(optax_learned.load_weights, copy)


def test_version_1_checkpoint_fails_naming_both_versions(copy):
  """Checkpoints of the per-element design (format 1, optax_learned 0.1) do not load."""
  _edit_config(copy, lambda c: c.update(format_version=1))
  message = r"format version 1 .*reads format versions 2 to 4"
  with pytest.raises(optax_learned.CheckpointVersionError, match=message):
    _call(optax_learned.load_weights, copy)
  with pytest.raises(optax_learned.CheckpointVersionError, match=message):
    _call(optax_learned.load, copy)
  with pytest.raises(optax_learned.CheckpointVersionError, match=message):
    optax_learned.load_metadata(copy)
  with pytest.raises(ValueError, match=r"optax-learned==0\.1\.0"):  # also a ValueError
    optax_learned.load_weights(copy)


def test_nan_in_config_is_refused(copy):
  text = (copy / "optimizer.json").read_text()
  text, count = re.subn(r'"matrix_step": [^,}\s]+', '"matrix_step": NaN', text)
  assert count == 1
  (copy / "optimizer.json").write_text(text)
  with pytest.raises(optax_learned.CheckpointConfigError, match="matrix_step must be a finite"):
    _call(optax_learned.load_weights, copy)


# -- missing, damaged and mismatched arrays --------------------------------------------------


def test_weights_directory_deleted(copy):
  shutil.rmtree(copy / "weights")
  with pytest.raises(optax_learned.CheckpointArraysError, match="weights directory is missing"):
    _call(optax_learned.load_weights, copy)


def test_weights_files_emptied(copy):
  for path in (copy / "weights").rglob("*"):
    if path.is_file():
      path.write_bytes(b"")
  with pytest.raises(optax_learned.CheckpointArraysError, match="cannot read the array metadata"):
    _call(optax_learned.load_weights, copy)


# When a read of a damaged file fails, an Orbax/TensorStore background thread later calls into
# the asyncio loop Orbax already closed ("Event loop is closed"); the error is raised and
# checked below, and nothing of ours runs in that thread.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "half", "flip", "delete"])
def test_damaged_orbax_files_raise_or_load_exactly(saved, tmp_path, damage):
  """Damaging any one file inside the Orbax directory never yields wrong arrays.

  Orbax keeps redundant files (per-process copies, commit markers), so some damage is
  harmless; every other file must give a CheckpointArraysError. The array metadata and data
  files are among the latter.
  """
  files = sorted(p.relative_to(saved) for p in (saved / "weights").rglob("*") if p.is_file())
  assert files
  raised = []
  for relative in files:
    target = tmp_path / f"{damage}_{len(raised)}_{relative.name}"
    shutil.copytree(saved, target)
    path = target / relative
    data = path.read_bytes()
    if damage == "truncate":
      path.write_bytes(b"")
    elif damage == "half":
      path.write_bytes(data[:len(data) // 2])
    elif damage == "flip":
      path.write_bytes(bytes(b ^ 0x5A for b in data))
    else:
      path.unlink()
    try:
      _, meta_params = _call(optax_learned.load_weights, target)
    except optax_learned.CheckpointArraysError:
      raised.append(str(relative))
    else:
      _assert_trees_bit_equal(meta_params, _meta_params())
  assert "weights/_METADATA" in raised, raised
  assert any(name.startswith("weights/d/") for name in raised), raised


def test_arrays_not_matching_the_config_shapes(copy):
  _edit_config(copy, lambda c: c["optimizer"].update(hidden_sizes=[7, 5]))
  with pytest.raises(optax_learned.CheckpointArraysError,
                     match=r"\['layer_0'\]\['b'\] has shape \(6,\).*expects shape \(7,\)"):
    _call(optax_learned.load_weights, copy)
  _edit_config(copy, lambda c: c["optimizer"].update(hidden_sizes=[6]))
  with pytest.raises(optax_learned.CheckpointArraysError, match=r"unexpected \[\"\['layer_2'\]"):
    _call(optax_learned.load_weights, copy)


def _rewrite_weights(path: pathlib.Path, tree) -> None:
  shutil.rmtree(path / "weights")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save((path / "weights").absolute(), tree)
    checkpointer.wait_until_finished()


def test_arrays_with_another_dtype(copy):
  _rewrite_weights(copy, jax.tree.map(lambda x: np.asarray(x, np.float16), _meta_params()))
  with pytest.raises(optax_learned.CheckpointArraysError,
                     match=r"dtype float16; the optimizer config expects .*dtype float32"):
    _call(optax_learned.load_weights, copy)


def test_arrays_with_extra_or_missing_entries(copy):
  tree = jax.tree.map(np.asarray, _meta_params())
  tree["payload"] = np.zeros(3, np.float32)
  _rewrite_weights(copy, tree)
  with pytest.raises(optax_learned.CheckpointArraysError, match=r"unexpected \[\"\['payload'\]"):
    _call(optax_learned.load_weights, copy)
  del tree["payload"], tree["log_base_step"]
  _rewrite_weights(copy, tree)
  with pytest.raises(optax_learned.CheckpointArraysError,
                     match=r"missing \[\"\['log_base_step'\]"):
    _call(optax_learned.load_weights, copy)


def test_non_finite_arrays(copy):
  tree = jax.tree.map(np.asarray, _meta_params())
  tree["layer_1"]["w"] = tree["layer_1"]["w"].copy()
  tree["layer_1"]["w"][0, 0] = np.inf
  _rewrite_weights(copy, tree)
  with pytest.raises(optax_learned.CheckpointArraysError,
                     match=r"\['layer_1'\]\['w'\] contains non-finite values"):
    _call(optax_learned.load_weights, copy)
