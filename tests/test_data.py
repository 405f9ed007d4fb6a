"""Tests of CIFAR-10 loading (synthetic npz files only; no real dataset needed)."""

import json
import os
import sys
import time
import types

import numpy as np
import pytest

from metatrain import data

NUM_ROWS = 60


def write_npz(directory, name=data.TRAIN_FILE, num_rows=NUM_ROWS, **arrays):
  """Writes a synthetic CIFAR npz whose row i has pixel [0, 0, 0] == i."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (num_rows, 32, 32, 3), dtype=np.uint8)
  x[:, 0, 0, 0] = np.arange(num_rows)
  contents = {"x": x, "y": (np.arange(num_rows) % 10).astype(np.uint8)}
  contents.update(arrays)
  contents = {k: v for k, v in contents.items() if v is not None}
  path = os.path.join(directory, name)
  np.savez(path, **contents)
  return path


@pytest.fixture
def no_env(monkeypatch, tmp_path):
  """No OPTAX_LEARNED_DATA, an empty TFDS data dir, and tensorflow_datasets not importable."""
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_empty"))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def test_load_from_explicit_directory(tmp_path, no_env):
  write_npz(tmp_path)
  splits = data.load_cifar10(str(tmp_path), validation_size=10)
  assert set(splits) == {"train", "valid"}
  for split, rows in (("train", 50), ("valid", 10)):
    assert splits[split]["image"].shape == (rows, 32, 32, 3)
    assert splits[split]["image"].dtype == np.uint8
    assert splits[split]["label"].shape == (rows,)
    assert splits[split]["label"].dtype == np.int32


def test_validation_is_last_rows_and_disjoint_from_train(tmp_path, no_env):
  write_npz(tmp_path)
  splits = data.load_cifar10(tmp_path, validation_size=10)
  train_rows = set(splits["train"]["image"][:, 0, 0, 0].tolist())
  valid_rows = set(splits["valid"]["image"][:, 0, 0, 0].tolist())
  assert valid_rows == set(range(50, 60))
  assert not train_rows & valid_rows
  assert train_rows | valid_rows == set(range(NUM_ROWS))


def test_holdout_rows_are_last_and_disjoint_from_train_and_valid(tmp_path, no_env):
  write_npz(tmp_path)
  splits = data.load_cifar10(tmp_path, validation_size=10, holdout_size=5)
  rows = {name: splits[name]["image"][:, 0, 0, 0].tolist() for name in splits}
  assert set(splits) == {"train", "valid", "holdout"}
  assert rows["train"] == list(range(45))
  assert rows["valid"] == list(range(45, 55))
  assert rows["holdout"] == list(range(55, 60))


@pytest.mark.parametrize("validation_size, holdout_size, problem", [
    (10, -1, "holdout_size must be in"),
    (10, NUM_ROWS - 1, "holdout_size must be in"),
    (NUM_ROWS - 5, 5, "validation_size must be in"),
    (0, 5, "validation_size must be in"),
])
def test_bad_split_sizes_are_rejected(tmp_path, no_env, validation_size, holdout_size, problem):
  write_npz(tmp_path)
  with pytest.raises(ValueError, match=problem):
    data.load_cifar10(tmp_path, validation_size=validation_size, holdout_size=holdout_size)


@pytest.mark.parametrize("stored", [8, 16])
def test_directory_of_pooled_images_loads(tmp_path, no_env, stored):
  images = np.random.default_rng(0).integers(0, 256, (NUM_ROWS, stored, stored, 3), np.uint8)
  np.savez(tmp_path / data.TRAIN_FILE, x=images, y=np.arange(NUM_ROWS) % 10)
  splits = data.load_cifar10(tmp_path, validation_size=10)
  assert splits["train"]["image"].shape == (50, stored, stored, 3)


def test_load_from_environment_variable(tmp_path, monkeypatch, no_env):
  write_npz(tmp_path)
  write_npz(tmp_path, data.TEST_FILE, num_rows=20)
  monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
  splits = data.load_cifar10(validation_size=5)
  assert splits["train"]["label"].shape == (55,)
  assert splits["test"]["image"].shape == (20, 32, 32, 3)
  assert data.resolve_source() == str(tmp_path)


@pytest.mark.parametrize("validation_size", [0, -1, NUM_ROWS])
def test_bad_validation_size(tmp_path, validation_size):
  write_npz(tmp_path)
  with pytest.raises(ValueError, match="validation_size"):
    data.load_cifar10(tmp_path, validation_size=validation_size)


def _assert_names_both_ways(message):
  assert data.ENV_VAR in message
  assert data.TRAIN_FILE in message
  assert 'pip install -e ".[data]"' in message
  assert "--data-dir" in message


def test_no_data_fails_fast_naming_both_ways(no_env):
  start = time.perf_counter()
  with pytest.raises(data.DataNotFoundError) as info:
    data.load_cifar10()
  assert time.perf_counter() - start < 1.0
  assert isinstance(info.value, FileNotFoundError)
  _assert_names_both_ways(str(info.value))
  assert "not installed" in str(info.value)


def test_tfds_installed_but_not_prepared_fails_without_building(monkeypatch, no_env):
  def builder(*args, **kwargs):
    raise AssertionError("tfds.builder must not be called when the data is not on disk")

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(builder=builder))
  with pytest.raises(data.DataNotFoundError) as info:
    data.load_cifar10("tfds")
  _assert_names_both_ways(str(info.value))
  assert "not prepared" in str(info.value)


def test_tfds_prepared_gives_train_valid_test(tmp_path, monkeypatch, no_env):
  version_dir = tmp_path / "tfds" / "cifar10" / "3.0.2"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text(json.dumps({}))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  sizes = {"train": 30, "test": 12}

  class Builder:
    def download_and_prepare(self):
      raise AssertionError("no download without download=True")

    def as_dataset(self, split, batch_size):
      assert batch_size == -1
      n = sizes[split]
      return {"image": np.zeros((n, 32, 32, 3), np.uint8), "label": np.arange(n) % 10}

  fake = types.SimpleNamespace(builder=lambda name: Builder(), as_numpy=lambda tree: tree)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  splits = data.load_cifar10(validation_size=6)
  assert {k: v["label"].shape[0] for k, v in splits.items()} == {"train": 24, "valid": 6,
                                                                 "test": 12}
  assert splits["test"]["label"].dtype == np.int32


def test_directory_without_train_file(tmp_path, no_env):
  with pytest.raises(data.DataNotFoundError, match=data.TRAIN_FILE) as info:
    data.load_cifar10(tmp_path)
  assert str(tmp_path) in str(info.value)
  with pytest.raises(data.DataNotFoundError, match="not a directory"):
    data.load_cifar10(tmp_path / "missing")


@pytest.mark.parametrize("arrays, problem", [
    ({"y": None}, r"missing key\(s\) \['y'\]"),
    ({"x": np.zeros((NUM_ROWS, 32, 32, 3), np.float32)}, "must be uint8"),
    ({"x": np.zeros((NUM_ROWS, 28, 28, 3), np.uint8)}, r"shape \[N, R, R, 3\] with R in"),
    ({"x": np.zeros((NUM_ROWS, 16, 8, 3), np.uint8)}, r"shape \[N, R, R, 3\] with R in"),
    ({"y": np.zeros((NUM_ROWS, 1), np.int64)}, "labels `y` must have shape"),
    ({"y": np.full((NUM_ROWS,), 10)}, r"must lie in \[0, 9\]"),
    ({"y": np.zeros((NUM_ROWS,), np.float32)}, "must be integers"),
])
def test_bad_npz_names_file_and_problem(tmp_path, arrays, problem):
  path = write_npz(tmp_path, **arrays)
  with pytest.raises(data.InvalidDataError, match=problem) as info:
    data.load_cifar10(tmp_path)
  assert path in str(info.value)


def test_corrupt_npz_names_file(tmp_path):
  path = tmp_path / data.TRAIN_FILE
  path.write_bytes(b"not a zip file at all")
  with pytest.raises(data.InvalidDataError, match="not a readable") as info:
    data.load_cifar10(tmp_path)
  assert str(path) in str(info.value)


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_resize_shapes(resolution):
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  resized = data.resize_images(images, resolution, chunk_size=2)
  assert resized.shape == (5, resolution, resolution, 3)
  assert resized.dtype == np.uint8


def test_resize_averages_blocks():
  images = np.zeros((1, 4, 4, 1), np.uint8)
  images[0, :2, :2, 0] = [[0, 1], [2, 3]]  # mean 1.5 rounds to 2
  images[0, 2:, 2:, 0] = 255
  np.testing.assert_array_equal(data.resize_images(images, 2)[0, ..., 0], [[2, 0], [0, 255]])


@pytest.mark.parametrize("resolution", [0, 5, 64])
def test_resize_rejects_bad_resolution(resolution):
  with pytest.raises(ValueError, match="divisor"):
    data.resize_images(np.zeros((1, 32, 32, 3), np.uint8), resolution)
