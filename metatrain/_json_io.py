"""Strict-JSON helpers shared by the baseline cache, the evaluation and its reports."""

import math
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
  """Strict-JSON form: tuples to lists, numpy scalars to Python, NaN and infinities to None."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value


def atomic_write(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename, readable by all."""
  with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
    f.write(text)
  os.chmod(f.name, 0o644)  # NamedTemporaryFile creates files readable by the owner only
  os.replace(f.name, path)


def float_array(values: Any) -> np.ndarray:
  """A float array; ``None`` entries (NaN in JSON) become NaN."""
  return np.asarray(values, dtype=np.float64)


def lr_key(learning_rate: float) -> str:
  """The key of a learning rate in the evaluation results' dicts."""
  return repr(float(learning_rate))
