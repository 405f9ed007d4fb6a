"""Tests of CIFAR-10 loading: synthetic npz files, and TFDS with the real library.

The TFDS tests use the installed ``tensorflow-datasets`` (the ``data`` extra, no TensorFlow),
either under ``tfds.testing.mock_data`` or preparing a tiny synthetic CIFAR-10 archive on disk
through the real builder, with the network replaced at the download (nothing is fetched).
"""

import contextlib
import functools
import io
import json
import os
import pathlib
import shlex
import shutil
import sys
import tarfile
import time
import tomllib
import types

import jax
import numpy as np
import pytest

from metatrain import data
from metatrain.tasks import cifar as cifar_tasks
from metatrain.tasks.convnet import ConvNetTask

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


# -- TFDS through the real library (no TensorFlow, no network) -----------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
LABEL_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def write_cifar_archive(path, rows_per_batch=4, test_rows=6):
  """Writes a CIFAR-10 binary archive (the layout of cifar-10-binary.tar.gz) with few rows.

  Row i (train rows 0.., test rows 1000..) has label i % 10 and encodes i in pixel [0, 0, :2].
  Returns ``(path, rows)``, with ``rows[i] = (label, uint8 HWC image)``.
  """
  rng = np.random.default_rng(0)
  rows, files = {}, {}

  def records(first, count):
    out = []
    for i in range(first, first + count):
      image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      image[0, 0, :2] = divmod(i, 256)
      rows[i] = (i % 10, image)
      out.append(bytes([i % 10]) + image.transpose(2, 0, 1).tobytes())  # label, then CHW
    return b"".join(out)

  for batch in range(5):
    files[f"data_batch_{batch + 1}.bin"] = records(batch * rows_per_batch, rows_per_batch)
  files["test_batch.bin"] = records(1000, test_rows)
  files["batches.meta.txt"] = ("\n".join(LABEL_NAMES) + "\n\n").encode()
  with tarfile.open(path, "w:gz") as tar:
    for name, content in files.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return str(path), rows


def row_ids(images):
  return (images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 0, 1]).tolist()


@pytest.fixture
def real_tfds(monkeypatch, tmp_path):
  """The installed tensorflow_datasets (the `data` extra) and an empty TFDS data dir.

  The extra installs no TensorFlow, and the code reads and prepares without it; in an
  environment that has TensorFlow anyway, only the TFRecord tests decide as if it had not.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  pytest.importorskip("PIL")
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  cifar_tasks._device_data.cache_clear()  # tasks cache loaded data by source ("tfds")
  yield tfds
  cifar_tasks._device_data.cache_clear()


@pytest.fixture
def serve_archive(real_tfds, monkeypatch, tmp_path):
  """Makes TFDS's download of the CIFAR-10 archive return a synthetic one; counts downloads."""
  downloads = []

  def serve(rows_per_batch=4, test_rows=6):
    path, rows = write_cifar_archive(tmp_path / "cifar-10-binary.tar.gz", rows_per_batch,
                                     test_rows)

    def download(self, url):
      assert url == CIFAR_URL
      downloads.append(url)
      return path

    monkeypatch.setattr(real_tfds.download.DownloadManager, "download", download)
    return rows

  serve.downloads = downloads
  return serve


@functools.partial(jax.jit, static_argnums=0)
def initial_loss(task, task_data):
  key = jax.random.key(0)
  return task.loss(task.init_params(key), task.sample_batch(task_data, key, "valid"))


def _convnet_on_tfds():
  task = ConvNetTask(resolution=8, batch_size=4, validation_size=10, data_dir="tfds")
  task_data = task.load_data()
  assert task_data["train"]["image"].shape[1:] == (8, 8, 3)
  assert np.isfinite(float(initial_loss(task, task_data)))
  return task_data


def _prepared_dir():
  return pathlib.Path(os.environ["TFDS_DATA_DIR"]) / "cifar10" / "3.0.2"


def test_tfds_mock_data_download_and_convnet_task(real_tfds):
  with real_tfds.testing.mock_data(num_examples=24):
    splits = data.load_cifar10("tfds", download=True, validation_size=4)
    assert {k: v["image"].shape for k, v in splits.items()} == {
        "train": (20, 32, 32, 3), "valid": (4, 32, 32, 3), "test": (24, 32, 32, 3)}
    for split in splits.values():
      assert split["image"].dtype == np.uint8 and split["label"].dtype == np.int32
      assert 0 <= split["label"].min() and split["label"].max() < data.NUM_CLASSES
    # A task loads without download=True, so it first looks for prepared data on disk: give
    # it the metadata files of a prepared copy (the mock serves the records).
    _prepared_dir().mkdir(parents=True)
    real_tfds.builder("cifar10").info.write_to_directory(_prepared_dir())
    assert data._tfds_cifar10_on_disk(os.environ["TFDS_DATA_DIR"])
    _convnet_on_tfds()


def test_tfds_download_prepares_array_record_then_reads_it_and_a_convnet_task(serve_archive):
  rows = serve_archive()
  splits = data.load_cifar10("tfds", download=True, validation_size=5)
  assert serve_archive.downloads == [CIFAR_URL]
  prepared = _prepared_dir()
  info = json.loads((prepared / "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record"
  assert sorted(p.name for p in prepared.glob("*.array_record-*")) == [
      "cifar10-test.array_record-00000-of-00001", "cifar10-train.array_record-00000-of-00001"]
  assert (prepared / "label.labels.txt").read_text().split() == LABEL_NAMES

  def check(splits):
    assert {k: v["label"].shape[0] for k, v in splits.items()} == {"train": 15, "valid": 5,
                                                                   "test": 6}
    train_ids = row_ids(splits["train"]["image"]) + row_ids(splits["valid"]["image"])
    assert sorted(train_ids) == list(range(20))
    assert sorted(row_ids(splits["test"]["image"])) == list(range(1000, 1006))
    for split in splits.values():
      assert split["image"].dtype == np.uint8 and split["label"].dtype == np.int32
      for i, image, label in zip(row_ids(split["image"]), split["image"], split["label"],
                                 strict=True):
        np.testing.assert_array_equal(image, rows[i][1])  # PNG round trip is lossless
        assert label == rows[i][0]

  check(splits)
  # Already prepared: read without downloading, also with download=True, and by a task.
  check(data.load_cifar10("tfds", validation_size=5))
  check(data.load_cifar10("tfds", download=True, validation_size=5))
  assert serve_archive.downloads == [CIFAR_URL]
  _convnet_on_tfds()


def test_tfds_download_is_checked_against_the_registered_checksum(real_tfds, monkeypatch,
                                                                  tmp_path):
  """The real download manager fetches the archive and refuses one of the wrong checksum."""
  from tensorflow_datasets.core.download import downloader  # noqa: PLC0415

  payload = pathlib.Path(write_cifar_archive(tmp_path / "fake.tar.gz")[0]).read_bytes()
  fetched = []

  @contextlib.contextmanager
  def open_url(url, **kwargs):
    fetched.append(url)
    response = types.SimpleNamespace(url=url, headers={"Content-length": str(len(payload))})
    yield response, [payload]

  monkeypatch.setattr(downloader, "_open_url", open_url)
  with pytest.raises(Exception, match="has wrong checksum") as info:
    data.load_cifar10("tfds", download=True)
  assert type(info.value).__name__ == "NonMatchingChecksumError"
  assert fetched == [CIFAR_URL]
  assert not data._tfds_cifar10_on_disk(os.environ["TFDS_DATA_DIR"])


def _assert_bad_input_row(case_id, message):
  """The message has the row's gist fragments of docs/bad_inputs.toml, in order."""
  cases = tomllib.loads((REPO / "docs" / "bad_inputs.toml").read_text())["case"]
  (case,) = [case for case in cases if case["id"] == case_id]
  position = 0
  for fragment in case["gist"]:
    position = message.index(fragment, position) + len(fragment)


def _mark_as_tfrecord(prepared):
  """Turns a prepared copy into what a TFRecord preparation records in dataset_info.json."""
  info_path = prepared / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))


def _run_shell_commands(command, python_runs):
  """Runs `mv A B && python -c CODE` from a message: the mv, then CODE in this process."""
  for part in command.split(" && "):
    argv = shlex.split(part)
    if argv[0] == "mv":
      shutil.move(*argv[1:])
    else:
      assert argv[:2] == ["python", "-c"], argv
      python_runs.append(argv[2])
      exec(argv[2], {})  # noqa: S102 (the command the message gives)


def test_tfds_tfrecord_copy_without_tensorflow_says_how_to_reprepare(serve_archive,
                                                                    monkeypatch):
  monkeypatch.setattr(data, "_tensorflow_installed", lambda: False)
  serve_archive(rows_per_batch=1001)  # the command's default validation_size is 5000
  data.load_cifar10("tfds", download=True)
  prepared = _prepared_dir()
  _mark_as_tfrecord(prepared)
  for download in (False, True):  # download=True reuses the copy, so it fails the same way
    with pytest.raises(data.DataNotFoundError) as info:
      data.load_cifar10("tfds", download=download, validation_size=5)
    message = str(info.value)
    assert "prepared as tfrecord, which only TensorFlow reads" in message
    assert f"`{data.TENSORFLOW_INSTALL_COMMAND}`" in message
  _assert_bad_input_row("data-tfds-tfrecord-without-tensorflow", message)
  command = message.split("keeping the old copy aside: `")[1].split("`;")[0]
  assert command == (f"mv {prepared.parent} {prepared.parent}-tfrecord && "
                     f"{data.TFDS_DOWNLOAD_COMMAND}")
  runs = []
  _run_shell_commands(command, runs)
  assert runs == [shlex.split(data.TFDS_DOWNLOAD_COMMAND)[2]]
  assert len(serve_archive.downloads) == 2
  assert json.loads((prepared / "dataset_info.json").read_text())["fileFormat"] == "array_record"
  assert (prepared.parent.parent / "cifar10-tfrecord" / "3.0.2" / "dataset_info.json").is_file()
  assert data.load_cifar10("tfds")["train"]["image"].shape == (5, 32, 32, 3)


def test_tfds_tfrecord_copy_is_read_through_tf_data_when_tensorflow_is_installed(
    real_tfds, serve_archive, monkeypatch):
  serve_archive()
  data.load_cifar10("tfds", download=True, validation_size=5)
  _mark_as_tfrecord(_prepared_dir())
  sizes = {"train": 30, "test": 12}
  calls = []

  def as_dataset(self, split, batch_size):  # a stand-in for tf.data; TensorFlow is absent
    calls.append((split, batch_size))
    n = sizes[split]
    return {"image": np.zeros((n, 32, 32, 3), np.uint8), "label": np.arange(n) % 10}

  monkeypatch.setattr(data, "_tensorflow_installed", lambda: True)
  monkeypatch.setattr(real_tfds.core.DatasetBuilder, "as_dataset", as_dataset)
  monkeypatch.setattr(real_tfds, "as_numpy", lambda tree: tree)
  splits = data.load_cifar10("tfds", validation_size=6)
  assert calls == [("train", -1), ("test", -1)]
  assert {k: v["label"].shape[0] for k, v in splits.items()} == {"train": 24, "valid": 6,
                                                                 "test": 12}


def test_tfds_without_pillow_names_the_data_extra(serve_archive, monkeypatch):
  serve_archive()
  monkeypatch.setitem(sys.modules, "PIL", None)
  with pytest.raises(data.DataNotFoundError) as info:
    data.load_cifar10("tfds", download=True)
  assert "needs Pillow, which the `data` extra installs" in str(info.value)
  _assert_bad_input_row("data-tfds-without-pillow", str(info.value))
  _assert_names_both_ways(str(info.value))
  assert serve_archive.downloads == []


def test_tfds_installed_but_not_prepared_names_the_commands(real_tfds):
  with pytest.raises(data.DataNotFoundError) as info:
    data.load_cifar10("tfds")
  assert "not prepared" in str(info.value)
  assert f"`{data.TFDS_INSTALL_COMMAND}`" in str(info.value)
  assert f"`{data.TFDS_DOWNLOAD_COMMAND}`" in str(info.value)


@pytest.mark.parametrize("path", ["README.md", "docs/installation.md"])
def test_docs_give_the_tfds_commands_the_code_and_tests_use(path):
  text = (REPO / path).read_text()
  assert data.TFDS_INSTALL_COMMAND in text
  assert data.TFDS_DOWNLOAD_COMMAND in text
  if path == "docs/installation.md":
    assert (f"mv ~/tensorflow_datasets/cifar10 ~/tensorflow_datasets/cifar10-tfrecord && "
            f"{data.TFDS_DOWNLOAD_COMMAND}") in text
    assert f"`{data.TENSORFLOW_INSTALL_COMMAND}`" in text


def test_data_extra_installs_what_the_tfds_route_imports_and_no_tensorflow():
  extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]["data"]
  names = {requirement.split(";")[0].split(">")[0].split("=")[0].strip().lower()
           for requirement in extra}
  assert names == {"tensorflow-datasets", "array_record", "pillow"}
