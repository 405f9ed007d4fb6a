"""Saving and loading learned optimizers: an Orbax directory of arrays plus a JSON config.

A checkpoint is a directory::

  path/
    optimizer.json   # {"format_version", "package_version", "optimizer", "metadata"}
    weights/         # Orbax StandardCheckpointer directory of the meta-parameters

Nothing is unpickled, evaluated or imported from a checkpoint: the config is plain JSON read
into :class:`LearnedOptimizer`, and the arrays are checked against the shapes and dtypes that
config implies before they are restored.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import optax

from optax_learned._src import errors
from optax_learned._src.learned_optimizer import LearnedOptimizer, MetaParams

FORMAT_VERSION = 4
"""The checkpoint layout this version writes. Version 4 adds the optimizer field
``weight_decay``; version 3 checkpoints predate it and load with none. Version 3 added
``anneal_steps``; version 2 checkpoints (the same hierarchical optimizer: per-tensor
network, Adam-shaped state) predate both and load with no decay, as they were trained.
Version 1 (0.1) held the per-element MLP, which this version no longer implements, so
version 1 checkpoints fail to load with a message naming version 1 and the versions read."""
# Fields a format version predates, with the value that reproduces its behaviour.
_ADDED_FIELDS = {3: {"anneal_steps": None}, 4: {"weight_decay": 0.0}}
CONFIG_FILE = "optimizer.json"
WEIGHTS_DIR = "weights"
_CONFIG_KEYS = {"format_version", "package_version", "optimizer", "metadata"}
_BUNDLED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

PathLike = str | os.PathLike


def _package_version() -> str:
  from optax_learned import __version__  # pylint: disable=import-outside-toplevel
  return __version__


def bundled_root() -> pathlib.Path:
  """The folder of bundled checkpoints: inside the wheel, or ``checkpoints/`` in a checkout."""
  package_dir = pathlib.Path(__file__).resolve().parents[1]
  for candidate in (package_dir / "_bundled", package_dir.parent / "checkpoints"):
    if candidate.is_dir():
      return candidate
  return package_dir / "_bundled"


def available() -> dict[str, str]:
  """Bundled learned optimizers, each with its one-line description.

  Returns:
    A dict from bundled name (usable with :func:`load`) to description, sorted by name.
  """
  root = bundled_root()
  if not root.is_dir():
    return {}
  found = {}
  for entry in sorted(root.iterdir()):
    config_file = entry / CONFIG_FILE
    if entry.is_dir() and config_file.is_file():
      metadata = _read_config(config_file).get("metadata") or {}
      found[entry.name] = str(metadata.get("description", ""))
  return found


def _bundled_dir(name: str) -> pathlib.Path:
  """The directory of a bundled optimizer, refusing names that are not plain names."""
  root = bundled_root().resolve()
  candidate = (root / name).resolve() if _BUNDLED_NAME.match(name) else None
  if candidate is None or candidate.parent != root:
    raise errors.UnknownOptimizerError(
        f"{name!r} is not a valid bundled optimizer name: bundled names are plain names such "
        f"as 'cifar' and may not point outside {root}. Available: {sorted(available())}")
  return candidate


def _resolve(name_or_path: PathLike) -> pathlib.Path:
  """Maps a bundled name or a directory path to a checkpoint directory."""
  if isinstance(name_or_path, os.PathLike):
    return pathlib.Path(name_or_path)
  if not isinstance(name_or_path, str):
    raise TypeError(f"expected a bundled name or a path, got {type(name_or_path).__name__}")
  is_plain = "/" not in name_or_path and os.sep not in name_or_path and name_or_path not in (
      ".", "..", "")
  if not is_plain:
    return pathlib.Path(name_or_path)
  bundled = _bundled_dir(name_or_path)
  if bundled.is_dir():
    return bundled
  if pathlib.Path(name_or_path).is_dir():
    return pathlib.Path(name_or_path)
  raise errors.UnknownOptimizerError(
      f"no bundled learned optimizer named {name_or_path!r}; available: "
      f"{sorted(available()) or 'none yet'}. To load a directory, pass its path "
      f"(e.g. './{name_or_path}').")


def save(path: PathLike, lopt: LearnedOptimizer, meta_params: MetaParams, *,
         metadata: dict[str, Any] | None = None, overwrite: bool = False) -> pathlib.Path:
  """Writes a learned optimizer checkpoint directory.

  Args:
    path: the directory to create.
    lopt: the optimizer configuration.
    meta_params: its weights, shaped as ``lopt.init`` returns them.
    metadata: JSON-serialisable information stored beside the config (e.g. a
      ``description`` shown by :func:`available`, the training config, results).
    overwrite: replace an existing checkpoint at ``path``.

  Returns:
    The checkpoint directory.

  Raises:
    FileExistsError: if ``path`` exists and ``overwrite`` is false.
    TypeError: if ``metadata`` is not JSON-serialisable.
    CheckpointArraysError: if ``meta_params`` do not match ``lopt``'s shapes and dtypes, or
      are not all finite (such a checkpoint could not be loaded).
  """
  path = pathlib.Path(path).absolute()
  config = {"format_version": FORMAT_VERSION, "package_version": _package_version(),
            "optimizer": lopt.to_dict(), "metadata": metadata or {}}
  try:
    config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"metadata must be JSON-serialisable: {e}") from e
  _check_arrays(meta_params, lopt, where="meta_params")
  _check_finite(meta_params, where="meta_params")
  if path.exists():
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not (path / CONFIG_FILE).is_file():
      raise FileExistsError(
          f"refusing to overwrite {path}: it is not a learned optimizer checkpoint")
    shutil.rmtree(path)
  path.mkdir(parents=True)
  import orbax.checkpoint as ocp  # noqa: PLC0415 (heavy: loaded when a checkpoint is touched)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path / WEIGHTS_DIR, jax.tree.map(np.asarray, meta_params))
    checkpointer.wait_until_finished()
  # The config is written last and atomically: a directory without it is not a checkpoint.
  with tempfile.NamedTemporaryFile("w", dir=path, delete=False, suffix=".tmp") as f:
    f.write(config_text)
  os.chmod(f.name, 0o644)  # NamedTemporaryFile creates files readable by the owner only
  os.replace(f.name, path / CONFIG_FILE)
  return path


def _read_config(config_file: pathlib.Path) -> dict[str, Any]:
  try:
    config = json.loads(config_file.read_text(encoding="utf-8"))
  except (OSError, ValueError, RecursionError) as e:  # ValueError covers JSON and UTF-8.
    raise errors.CheckpointConfigError(f"{config_file}: cannot read the config: {e}") from e
  if not isinstance(config, dict):
    raise errors.CheckpointConfigError(f"{config_file}: the config must be a JSON object")
  missing = sorted({"format_version", "optimizer"} - set(config))
  if missing:
    raise errors.CheckpointConfigError(f"{config_file}: missing key(s) {missing}")
  unknown = sorted(set(config) - _CONFIG_KEYS)
  if unknown:
    raise errors.CheckpointConfigError(
        f"{config_file}: unknown key(s) {unknown}; known keys are {sorted(_CONFIG_KEYS)}")
  version = config["format_version"]
  if isinstance(version, bool) or not isinstance(version, int) or version < 1:
    raise errors.CheckpointConfigError(
        f"{config_file}: format_version must be a positive integer, got {version!r}")
  if version > FORMAT_VERSION:
    raise errors.CheckpointVersionError(
        f"{config_file}: format version {version} is newer than this optax_learned "
        f"({_package_version()}) reads (up to {FORMAT_VERSION}); upgrade optax_learned")
  if version < 2:
    raise errors.CheckpointVersionError(
        f"{config_file}: format version {version} holds the per-element MLP optimizer of "
        f"optax_learned 0.1; this optax_learned ({_package_version()}) reads format versions "
        f"2 to {FORMAT_VERSION} (the hierarchical optimizer). Load it with "
        "optax-learned==0.1.0, or meta-train it again with this version")
  if not isinstance(config.get("metadata") or {}, dict):
    raise errors.CheckpointConfigError(f"{config_file}: metadata must be a JSON object")
  return config


def _check_arrays(tree: Any, lopt: LearnedOptimizer, where: str) -> None:
  """Raises CheckpointArraysError when ``tree``'s arrays differ from what ``lopt`` expects."""
  expected = {jax.tree_util.keystr(k): v for k, v in
              jax.tree_util.tree_flatten_with_path(lopt.meta_params_shapes())[0]}
  found = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
  if missing or extra:
    raise errors.CheckpointArraysError(
        f"{where}: arrays do not match the optimizer config: missing {missing}, unexpected {extra}")
  for key, spec in expected.items():
    shape, dtype = tuple(found[key].shape), np.dtype(found[key].dtype)
    if shape != spec.shape or dtype != spec.dtype:
      raise errors.CheckpointArraysError(
          f"{where}: array {key} has shape {shape} and dtype {dtype}; the optimizer config "
          f"expects shape {spec.shape} and dtype {spec.dtype}")


def _check_finite(tree: Any, where: str) -> None:
  """Raises CheckpointArraysError when an array of ``tree`` has a NaN or an infinity."""
  for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not np.all(np.isfinite(np.asarray(leaf))):
      raise errors.CheckpointArraysError(
          f"{where}: array {jax.tree_util.keystr(key)} contains non-finite values")


def _read(name_or_path: PathLike) -> tuple[LearnedOptimizer, MetaParams, dict[str, Any]]:
  path = _resolve(name_or_path)
  if not path.is_dir():
    raise errors.CheckpointNotFoundError(f"no checkpoint directory at {path} ({path.absolute()})")
  config_file = path / CONFIG_FILE
  if not config_file.is_file():
    raise errors.CheckpointNotFoundError(
        f"{path} is not a learned optimizer checkpoint: it has no {CONFIG_FILE}")
  config = _read_config(config_file)
  optimizer = config["optimizer"]
  if isinstance(optimizer, dict):  # an older format: the fields it predates
    for version in range(config["format_version"] + 1, FORMAT_VERSION + 1):
      optimizer = {**_ADDED_FIELDS.get(version, {}), **optimizer}
  lopt = _optimizer_from_config(optimizer, config_file)
  weights = (path / WEIGHTS_DIR).absolute()
  if not weights.is_dir():
    raise errors.CheckpointArraysError(f"{weights}: the weights directory is missing")
  import orbax.checkpoint as ocp  # noqa: PLC0415 (heavy: loaded when a checkpoint is touched)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      item_metadata = checkpointer.metadata(weights).item_metadata
      stored = None if item_metadata is None else item_metadata.tree
    except Exception as e:  # Orbax raises many types for unreadable metadata.
      raise errors.CheckpointArraysError(
          f"{weights}: cannot read the array metadata: {type(e).__name__}: {e}") from e
    if stored is None:
      raise errors.CheckpointArraysError(
          f"{weights}: cannot read the array metadata: the Orbax directory is incomplete or "
          "corrupted")
    _check_arrays(stored, lopt, where=str(weights))
    try:
      meta_params = checkpointer.restore(weights, lopt.meta_params_shapes())
    except Exception as e:  # Truncated or corrupted array files.
      raise errors.CheckpointArraysError(
          f"{weights}: cannot restore the arrays: {type(e).__name__}: {e}") from e
  _check_arrays(meta_params, lopt, where=str(weights))
  _check_finite(meta_params, where=str(weights))
  return lopt, meta_params, config.get("metadata") or {}


def _optimizer_from_config(optimizer: Any, config_file: pathlib.Path) -> LearnedOptimizer:
  """The optimizer of a checkpoint config, which must name every configuration field.

  A stored optimizer is complete: filling a missing field from the current defaults would
  silently change a trained optimizer whenever a default changes.
  """
  if not isinstance(optimizer, dict):
    raise errors.CheckpointConfigError(
        f"{config_file}: invalid optimizer config: it must be a JSON object, got "
        f"{type(optimizer).__name__}")
  missing = sorted({field.name for field in dataclasses.fields(LearnedOptimizer)} - set(optimizer))
  if missing:
    raise errors.CheckpointConfigError(
        f"{config_file}: invalid optimizer config: missing field(s) {missing}")
  try:
    return LearnedOptimizer.from_dict(optimizer)
  except (TypeError, ValueError) as e:
    raise errors.CheckpointConfigError(f"{config_file}: invalid optimizer config: {e}") from e


def load_weights(name_or_path: PathLike) -> tuple[LearnedOptimizer, MetaParams]:
  """Loads a learned optimizer's configuration and weights, e.g. to continue meta-training.

  Args:
    name_or_path: a bundled name (see :func:`available`) or a checkpoint directory.

  Returns:
    ``(lopt, meta_params)``.

  Raises:
    UnknownOptimizerError: an unknown bundled name, or one that is not a plain name.
    CheckpointNotFoundError: a missing directory, or one that is not a checkpoint.
    CheckpointConfigError: a malformed, incomplete or unknown-keyed config.
    CheckpointVersionError: a checkpoint of another format version.
    CheckpointArraysError: arrays missing, unreadable, or not matching the config.
  """
  lopt, meta_params, _ = _read(name_or_path)
  return lopt, meta_params


def load_metadata(name_or_path: PathLike) -> dict[str, Any]:
  """The metadata dict stored with a checkpoint (its config is validated too)."""
  path = _resolve(name_or_path)
  if not path.is_dir():
    raise errors.CheckpointNotFoundError(f"no checkpoint directory at {path} ({path.absolute()})")
  if not (path / CONFIG_FILE).is_file():
    raise errors.CheckpointNotFoundError(
        f"{path} is not a learned optimizer checkpoint: it has no {CONFIG_FILE}")
  return _read_config(path / CONFIG_FILE).get("metadata") or {}


def load(name_or_path: PathLike, learning_rate: optax.ScalarOrSchedule = 1.0,
         num_steps: int | None = None):
  """Loads a learned optimizer as an Optax transformation.

  Example::

    tx = optax_learned.load("cifar")
    tx = optax_learned.load("cifar", learning_rate=0.3)  # smaller learned steps
    tx = optax_learned.load("cifar", num_steps=3000)     # anneals over a known length

  Args:
    name_or_path: a bundled name (see :func:`available`) or a checkpoint directory.
    learning_rate: a multiplier of every learned step (a scalar or an Optax schedule of the
      step count); 1.0, the default, takes the checkpoint's own steps. See
      :meth:`LearnedOptimizer.transform`.
    num_steps: the training length, if known: the steps then also decay to zero over it
      by a cosine. ``None`` (the default): the checkpoint's own decay
      (:attr:`LearnedOptimizer.anneal_steps`; ``cifar``'s is 1000), if any. See
      :meth:`LearnedOptimizer.transform`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

  Raises:
    UnknownOptimizerError: an unknown bundled name, or one that is not a plain name.
    CheckpointNotFoundError: a missing directory, or one that is not a checkpoint.
    CheckpointConfigError: a malformed, incomplete or unknown-keyed config.
    CheckpointVersionError: a checkpoint of another format version.
    CheckpointArraysError: arrays missing, unreadable, or not matching the config.
    TypeError, ValueError: ``num_steps`` not a positive integer.
  """
  lopt, meta_params = load_weights(name_or_path)
  return lopt.transform(meta_params, learning_rate=learning_rate, num_steps=num_steps)
