"""The baseline cache of :func:`metatrain.evaluation.evaluate`.

Baseline runs are cached as JSON files, one per (baseline, learning rate), keyed by the task
(name, overrides and resolved configuration, without ``data_dir``), ``steps``, ``seeds``, the
baseline, the learning rate, ``eval_every``, ``num_eval_batches``, the package and JAX
versions and the device kind (wall-clock times are only comparable on the same hardware), so a
rerun, or a rerun with a wider learning-rate grid, only trains what is new.

A file is named ``{task}-{baseline}-{digest}.json``, the digest a SHA-256 prefix of the key
(:func:`cache_key`), and holds the key, the host, the creation time and the run. :func:`read`
returns ``None`` for a missing file, and for an unreadable file or one whose stored key differs
(with a warning); the run is then trained again and :func:`write` replaces the file.
"""

import hashlib
import json
import logging
import os
import pathlib
import platform
import time
from typing import Any

import jax
import optax

import optax_learned
from metatrain._json_io import atomic_write, float_array, jsonable

logger = logging.getLogger(__name__)

Run = dict[str, Any]


def cache_key(task: str, overrides: dict[str, Any], task_config: dict[str, Any], baseline: str,
              learning_rate: float, protocol: dict[str, Any], *,
              schema_version: int) -> dict[str, Any]:
  """The key of a baseline run in the cache (see the module docstring).

  Args:
    task: the task name.
    overrides: the fields replaced in the task (``data_dir`` is left out of the key).
    task_config: the task's resolved configuration, without ``data_dir``.
    baseline: a key of :data:`metatrain.evaluation.BASELINES`.
    learning_rate: its learning rate.
    protocol: the evaluation protocol: ``steps``, ``seeds``, ``eval_every`` and
      ``num_eval_batches`` enter the key.
    schema_version: the version of the results' format.

  Returns:
    A strict-JSON dict, which also records the package, JAX and Optax versions, the backend,
    the device kind and the CPU count of this machine.
  """
  return jsonable({
      "schema_version": schema_version,
      "task": task, "task_overrides": {k: v for k, v in overrides.items() if k != "data_dir"},
      "task_config": task_config,
      "steps": protocol["steps"], "seeds": protocol["seeds"],
      "eval_every": protocol["eval_every"], "num_eval_batches": protocol["num_eval_batches"],
      "baseline": baseline, "learning_rate": learning_rate,
      "package_version": optax_learned.__version__, "jax_version": jax.__version__,
      "optax_version": optax.__version__, "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
  })


def _path(cache: pathlib.Path, key: dict[str, Any]) -> pathlib.Path:
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  return cache / f"{key['task']}-{key['baseline']}-{digest}.json"


def read(cache: pathlib.Path, key: dict[str, Any]) -> Run | None:
  """The run cached under ``key`` in the directory ``cache``.

  Args:
    cache: the cache directory.
    key: a :func:`cache_key`.

  Returns:
    The run, with NaN where JSON holds ``null`` in its float curves; ``None`` if there is no
    such file, or if it cannot be read or holds another key (logged as a warning).
  """
  path = _path(cache, key)
  try:
    entry = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    logger.warning("ignoring unreadable baseline cache file %s: %s", path, e)
    return None
  if not isinstance(entry, dict) or entry.get("key") != key or "run" not in entry:
    logger.warning("ignoring baseline cache file %s: its key does not match", path)
    return None
  logger.info("cached: %s lr=%g", key["baseline"], key["learning_rate"])
  return _from_json(entry["run"])


def write(cache: pathlib.Path, key: dict[str, Any], run: Run) -> None:
  """Caches ``run`` under ``key`` in the directory ``cache`` (created if needed), atomically.

  Args:
    cache: the cache directory.
    key: a :func:`cache_key`.
    run: a run of :func:`metatrain.evaluation.train_baseline`.
  """
  cache.mkdir(parents=True, exist_ok=True)
  entry = {"key": key, "hostname": platform.node(), "created": time.time(), "run": run}
  atomic_write(_path(cache, key), json.dumps(jsonable(entry), allow_nan=False))


def _from_json(run: Run) -> Run:
  """A run read back from JSON: ``None`` inside float curves becomes NaN."""
  float_lists = ("train_loss", "train_loss_window", "valid_loss", "accuracy", "seconds")
  run = dict(run)
  for name in float_lists:
    if run.get(name) is not None:
      run[name] = float_array(run[name]).tolist()
  run["seconds_per_step"] = float_array(run["seconds_per_step"]).tolist()
  run["mean"] = {k: (float_array(v).tolist() if isinstance(v, list) else
                     float("nan") if v is None else v) for k, v in run["mean"].items()}
  return run
