"""CIFAR-10 loading from a local ``.npz`` directory or TensorFlow Datasets.

Sources, in order of precedence:

1. A local directory holding ``cifar10_train.npz`` (and optionally ``cifar10_test.npz``), each
   with keys ``x`` (uint8, ``[N, 32, 32, 3]``, NHWC) and ``y`` (integer labels ``[N]``), given
   as ``source`` or through the environment variable ``OPTAX_LEARNED_DATA``.
2. TFDS ``cifar10`` (the ``data`` extra: ``tensorflow-datasets``, ``array_record`` and
   Pillow, no TensorFlow), imported only when used; prepared data is looked for under
   ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` before TFDS is touched, because building a
   TFDS builder for missing data may query remote storage. ``download=True`` downloads the
   archive once (checked against TFDS's registered checksum) and prepares it as ArrayRecord
   without TensorFlow; reading goes through ``builder.as_data_source()``. A copy prepared
   earlier as TFRecord is read through ``tf.data`` when TensorFlow is installed; without it,
   loading fails with a :class:`DataNotFoundError` giving the command that re-prepares it.

The training split is cut into up to three disjoint blocks of rows: ``"train"`` first, then
``"valid"`` (``validation_size`` rows), then, when ``holdout_size > 0``, ``"holdout"`` (the
last ``holdout_size`` rows). Meta-training measures its meta-loss on ``"valid"``; an
evaluation of a meta-trained optimizer validates on ``"holdout"``, rows that meta-training
never touched. A local directory may also hold images already average-pooled to 16x16 or 8x8
(``[N, R, R, 3]``); tasks then run at that resolution or below. Nothing is downloaded unless
``download=True``: without a local directory or prepared TFDS data, loading fails at once with
:class:`DataNotFoundError`.
"""

import importlib.util
import os
import shlex
import sys
import tarfile
import zipfile
from typing import Any

import numpy as np

ENV_VAR = "OPTAX_LEARNED_DATA"
TRAIN_FILE = "cifar10_train.npz"
TEST_FILE = "cifar10_test.npz"
TFDS = "tfds"
RESOLUTIONS = (8, 16, 32)
NUM_CLASSES = 10

Split = dict[str, np.ndarray]

# The commands of the TFDS route, quoted verbatim by the messages, the README and the docs.
TFDS_INSTALL_COMMAND = 'pip install -e ".[data]"'
TFDS_DOWNLOAD_COMMAND = (
    "python -c 'from metatrain import data; data.load_cifar10(\"tfds\", download=True)'")
TENSORFLOW_INSTALL_COMMAND = "pip install tensorflow"
_ARRAY_RECORD = "array_record"
_TFDS_SPLITS = ("train", "test")

_HOW_TO_PROVIDE = (
    f"Provide CIFAR-10 in one of two ways: (1) a directory containing {TRAIN_FILE} (keys "
    f"`x`: uint8 [N, 32, 32, 3], `y`: labels [N]; optionally also {TEST_FILE}), given with "
    f"--data-dir DIR (the metatrain CLI, examples and benchmarks) or the environment variable "
    f"{ENV_VAR}=DIR (or as `source` / a task's `data_dir` from Python); or (2) TFDS: "
    f"`{TFDS_INSTALL_COMMAND}` and download it once with `{TFDS_DOWNLOAD_COMMAND}`."
)


class DataNotFoundError(FileNotFoundError):
  """The requested dataset is not available locally (nothing was downloaded)."""


class InvalidDataError(ValueError):
  """A dataset file exists but is unreadable or has the wrong keys, dtype or shape."""


def resolve_source(source: str | os.PathLike | None = None) -> str:
  """Returns the source that :func:`load_cifar10` would use: a directory path or ``"tfds"``.

  Args:
    source: a directory, ``"tfds"``, or ``None`` for ``$OPTAX_LEARNED_DATA`` else TFDS.

  Returns:
    An absolute directory path, or ``"tfds"``.
  """
  if source is None:
    source = os.environ.get(ENV_VAR) or TFDS
  source = os.fspath(source)
  return source if source == TFDS else os.path.abspath(os.path.expanduser(source))


def load_cifar10(
    source: str | os.PathLike | None = None,
    *,
    validation_size: int = 5000,
    holdout_size: int = 0,
    download: bool = False,
) -> dict[str, Split]:
  """Loads CIFAR-10 as numpy arrays.

  Args:
    source: a directory containing ``cifar10_train.npz``; ``"tfds"`` for TensorFlow Datasets;
      ``None`` for ``$OPTAX_LEARNED_DATA`` when set, else TFDS.
    validation_size: rows of the training split that form ``"valid"``: the last ones, or the
      last ones before the holdout rows.
    holdout_size: rows at the very end of the training split that form ``"holdout"``, used by
      neither ``"train"`` nor ``"valid"`` (0: no holdout split).
    download: allow TFDS to download and prepare the dataset if it is not prepared yet.

  Returns:
    ``{"train": split, "valid": split}`` plus ``"holdout"`` when ``holdout_size > 0`` and
    ``"test"`` when a real test split exists, each split ``{"image": uint8 [N, R, R, 3],
    "label": int32 [N]}`` with ``R`` 32 (or the resolution a local directory stores).

  Raises:
    DataNotFoundError: no data at ``source`` (the message says how to provide it).
    InvalidDataError: a data file with missing keys or the wrong dtype or shape.
    ValueError: ``validation_size`` or ``holdout_size`` out of range (they must leave at
      least one training row).
  """
  source = resolve_source(source)
  if source == TFDS:
    splits = _load_tfds(download)
  else:
    splits = _load_directory(source)
  train = splits.pop("train")
  num_train = train["label"].shape[0]
  if holdout_size < 0 or holdout_size > num_train - 2:
    raise ValueError(
        f"holdout_size must be in [0, {num_train - 2}] for {num_train} training rows, "
        f"got {holdout_size}")
  if not 0 < validation_size < num_train - holdout_size:
    raise ValueError(
        f"validation_size must be in [1, {num_train - holdout_size - 1}] for {num_train} "
        f"training rows and holdout_size={holdout_size}, got {validation_size}")
  valid_end = num_train - holdout_size
  cut = valid_end - validation_size
  result = {
      "train": {k: v[:cut] for k, v in train.items()},
      "valid": {k: v[cut:valid_end] for k, v in train.items()},
  }
  if holdout_size:
    result["holdout"] = {k: v[valid_end:] for k, v in train.items()}
  result.update(splits)
  return result


def resize_images(images: np.ndarray, resolution: int, chunk_size: int = 4096) -> np.ndarray:
  """Average-pools square uint8 NHWC images down to ``resolution x resolution``.

  Args:
    images: uint8 array ``[N, H, H, C]``.
    resolution: output side; must divide ``H``.
    chunk_size: rows pooled at a time, to bound temporary memory.

  Returns:
    uint8 array ``[N, resolution, resolution, C]`` (rounded means); ``images`` itself when
    ``resolution == H``.

  Raises:
    ValueError: non-square or non-rank-4 images, or a resolution that does not divide ``H``.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f"images must be square NHWC [N, H, H, C], got shape {images.shape}")
  size = images.shape[1]
  if resolution <= 0 or size % resolution:
    raise ValueError(f"resolution must be a positive divisor of {size}, got {resolution}")
  if resolution == size:
    return images
  f = size // resolution
  n, _, _, c = images.shape
  out = np.empty((n, resolution, resolution, c), np.uint8)
  for start in range(0, n, chunk_size):
    chunk = images[start:start + chunk_size].astype(np.uint32)
    total = chunk.reshape(-1, resolution, f, resolution, f, c).sum(axis=(2, 4))
    out[start:start + chunk_size] = (total + f * f // 2) // (f * f)
  return out


def _load_directory(directory: str) -> dict[str, Split]:
  train_path = os.path.join(directory, TRAIN_FILE)
  if not os.path.isfile(train_path):
    problem = "is not a directory" if not os.path.isdir(directory) else f"has no {TRAIN_FILE}"
    raise DataNotFoundError(f"CIFAR-10 data directory {directory!r} {problem}. {_HOW_TO_PROVIDE}")
  splits = {"train": _read_npz(train_path)}
  test_path = os.path.join(directory, TEST_FILE)
  if os.path.isfile(test_path):
    splits["test"] = _read_npz(test_path)
  return splits


def _read_npz(path: str) -> Split:
  """Reads and validates one ``{x, y}`` npz file."""
  unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
  try:
    npz = np.load(path, allow_pickle=False)
  except unreadable as e:
    raise InvalidDataError(f"{path}: not a readable .npz file ({e})") from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise InvalidDataError(f"{path}: not an .npz archive with keys `x` and `y`")
  with npz:
    missing = sorted({"x", "y"} - set(npz.files))
    if missing:
      raise InvalidDataError(f"{path}: missing key(s) {missing}; found {sorted(npz.files)}")
    try:
      x, y = npz["x"], npz["y"]
    except unreadable as e:
      raise InvalidDataError(f"{path}: cannot read arrays ({e})") from e
  return _validate(path, x, y)


def _validate(where: str, x: Any, y: Any) -> Split:
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim == 0 or x.shape[0] == 0:
    raise InvalidDataError(f"{where}: images `x` have no rows (shape {x.shape})")
  if x.dtype != np.uint8:
    raise InvalidDataError(f"{where}: images `x` must be uint8, got {x.dtype}")
  if x.ndim != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2] or x.shape[1] not in RESOLUTIONS:
    raise InvalidDataError(f"{where}: images `x` must have shape [N, R, R, 3] with R in "
                           f"{RESOLUTIONS} (32 for CIFAR-10 as published), got {x.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise InvalidDataError(f"{where}: labels `y` must be integers, got {y.dtype}")
  if y.shape != x.shape[:1]:
    raise InvalidDataError(f"{where}: labels `y` must have shape [{x.shape[0]}], got {y.shape}")
  if y.min() < 0 or y.max() >= NUM_CLASSES:
    raise InvalidDataError(f"{where}: labels `y` must lie in [0, {NUM_CLASSES - 1}], got "
                           f"[{y.min()}, {y.max()}]")
  return {"image": x, "label": y.astype(np.int32)}


def _load_tfds(download: bool) -> dict[str, Split]:
  root = _tfds_data_root()
  installed = _tfds_installed()
  if not download and not (installed and _tfds_cifar10_on_disk(root)):
    problem = ("tensorflow-datasets is not installed" if not installed else
               f"TFDS cifar10 is not prepared under {root!r} and download=False")
    raise DataNotFoundError(f"No CIFAR-10 found: {ENV_VAR} is not set and {problem}. "
                            f"{_HOW_TO_PROVIDE}")
  if not installed:
    raise DataNotFoundError(f"download=True needs tensorflow-datasets. {_HOW_TO_PROVIDE}")
  import tensorflow_datasets as tfds  # noqa: PLC0415 (optional dependency)

  if download:
    _require_tf_free_modules("downloading and preparing TFDS cifar10", opencv_will_do=False)
    # Prepared as ArrayRecord, which TFDS reads without TensorFlow; a copy already prepared
    # (in either format) is reused as it is.
    _tf_free_cifar10_builder(tfds, root).download_and_prepare(
        file_format=_ARRAY_RECORD,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  builder = tfds.builder("cifar10", data_dir=root)
  try:
    sources = {name: builder.as_data_source(split=name) for name in _TFDS_SPLITS}
  except NotImplementedError:  # prepared in a format without random access: TFRecord
    if not _tensorflow_installed():
      raise DataNotFoundError(_tfrecord_without_tensorflow(builder)) from None
    return {name: _read_tfds_dataset(tfds, builder, name) for name in _TFDS_SPLITS}
  except ModuleNotFoundError:
    _require_tf_free_modules("reading TFDS cifar10")  # array_record, named in the message
    raise
  _require_tf_free_modules("reading TFDS cifar10")  # an image decoder for the PNGs
  return {name: _read_tfds_data_source(name, source) for name, source in sources.items()}


def _read_tfds_data_source(split: str, source) -> Split:
  """Reads one split from a TFDS ArrayRecord data source (no TensorFlow)."""
  where = f"tfds cifar10[{split}]"
  rows = [source[i] for i in range(len(source))]
  if not rows:
    raise InvalidDataError(f"{where}: the split has no rows")
  return _validate(where, np.stack([row["image"] for row in rows]),
                   np.array([row["label"] for row in rows]))


def _read_tfds_dataset(tfds, builder, split: str) -> Split:
  """Reads one split through ``tf.data`` (a TFRecord copy; needs TensorFlow)."""
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return _validate(f"tfds cifar10[{split}]", arrays["image"], arrays["label"])


def _tfrecord_without_tensorflow(builder) -> str:
  version_dir = os.fspath(builder.data_dir)
  dataset_dir = os.path.dirname(version_dir)  # .../cifar10, above the version directory
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  return (
      f"TFDS cifar10 under {version_dir!r} is prepared as {file_format}, which only "
      "TensorFlow reads, and TensorFlow is not installed (the `data` extra reads ArrayRecord "
      "without it). Either re-prepare it as ArrayRecord, keeping the old copy aside: "
      f"`{_reprepare_command(dataset_dir)}`; or install TensorFlow "
      f"(`{TENSORFLOW_INSTALL_COMMAND}`), which reads the copy as it is.")


def _reprepare_command(dataset_dir: str) -> str:
  """The shell command that moves a TFRecord copy of TFDS cifar10 aside and prepares ArrayRecord.

  Args:
    dataset_dir: the TFDS ``cifar10`` directory (the one holding the version directory).

  Returns:
    ``mv DIR DIR-tfrecord && python -c '...download=True)'``, with the paths shell-quoted.
  """
  aside = dataset_dir + "-tfrecord"
  return f"mv {shlex.quote(dataset_dir)} {shlex.quote(aside)} && {TFDS_DOWNLOAD_COMMAND}"


def _require_tf_free_modules(what: str, *, opencv_will_do: bool = True) -> None:
  """Raises :class:`DataNotFoundError` unless array_record and an image codec are importable."""
  missing = []
  if importlib.util.find_spec("array_record") is None:
    missing.append("array_record")
  codecs = ("PIL", "cv2") if opencv_will_do else ("PIL",)
  if all(importlib.util.find_spec(module) is None for module in codecs):
    missing.append("Pillow")
  if missing:
    raise DataNotFoundError(
        f"{what} without TensorFlow needs {' and '.join(missing)}, which the `data` extra "
        f"installs: `{TFDS_INSTALL_COMMAND}`. {_HOW_TO_PROVIDE}")


def _tensorflow_installed() -> bool:
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"] is not None
  return importlib.util.find_spec("tensorflow") is not None


def _tf_free_cifar10_builder(tfds, root: str):
  """A TFDS ``cifar10`` builder that downloads and prepares without TensorFlow.

  TFDS's own ``cifar10`` builder reads the archive through ``tf.io.gfile`` and encodes PNGs
  with ``tf.image``, so preparing it needs TensorFlow even as ArrayRecord. This subclass
  writes the same dataset (name, version, features, label names, keys and so row order)
  from the same verified download, reading the archive with :mod:`tarfile` and handing TFDS
  Pillow images, which it encodes without TensorFlow. The stock builder reads the result.
  """
  from tensorflow_datasets.image_classification import cifar  # noqa: PLC0415

  class Cifar10WithoutTensorFlow(cifar.Cifar10, skip_registration=True):
    name = "cifar10"
    # The checksums of TFDS's own cifar10 download (size and sha256 of the archive), found
    # without `code_path`, which needs `importlib_resources` in TFDS 4.9.10.
    _checksums_path = tfds.core.utils.tfds_path() / "url_checksums" / "cifar10.txt"

    def _split_generators(self, dl_manager):
      info = self._cifar_info
      archive = os.fspath(dl_manager.download(info.url))
      with tarfile.open(archive, "r:gz") as tar:
        (label_file,) = info.label_files
        names = _tar_read(tar, info.prefix + label_file).decode().split("\n")
        self.info.features["label"].names = [name for name in names if name]
      return {
          "train": self._examples(archive, "train_", info.train_files),
          "test": self._examples(archive, "test_", info.test_files),
      }

    def _examples(self, archive, split_prefix, files):
      from PIL import Image  # noqa: PLC0415 (part of the `data` extra)

      index = 0
      with tarfile.open(archive, "r:gz") as tar:
        for file in files:
          raw = np.frombuffer(_tar_read(tar, self._cifar_info.prefix + file), np.uint8)
          records = raw.reshape(-1, 1 + 3 * 32 * 32)
          images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
          for label, image in zip(records[:, 0], images, strict=True):
            yield index, {"id": f"{split_prefix}{index:05d}", "label": int(label),
                          "image": Image.fromarray(np.ascontiguousarray(image))}
            index += 1

  return Cifar10WithoutTensorFlow(data_dir=root)


def _tar_read(tar: tarfile.TarFile, name: str) -> bytes:
  try:
    member = tar.extractfile(name)
  except KeyError:
    member = None
  if member is None:
    raise InvalidDataError(f"{tar.name}: the CIFAR-10 archive has no file {name}")
  with member:
    return member.read()


def _tfds_installed() -> bool:
  """Whether ``tensorflow_datasets`` can be imported, checked without importing it."""
  if "tensorflow_datasets" in sys.modules:
    return sys.modules["tensorflow_datasets"] is not None
  return importlib.util.find_spec("tensorflow_datasets") is not None


def _tfds_data_root() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _tfds_cifar10_on_disk(root: str) -> bool:
  """Whether prepared TFDS cifar10 data exists under ``root``, checked without TFDS or network.

  Building a TFDS builder for data that is not on disk may query remote storage, so this
  check runs first. Remote roots (``gs://...``) cannot be checked here and count as present.
  """
  if "://" in root:
    return True
  directory = os.path.join(root, "cifar10")
  if not os.path.isdir(directory):
    return False
  return any(os.path.isfile(os.path.join(directory, version, "dataset_info.json"))
             for version in os.listdir(directory))
