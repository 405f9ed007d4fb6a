"""The task protocol: what meta-training needs from an inner training problem.

A :class:`Task` is a frozen, hashable description (static under ``jit``); the arrays it trains
on are a separate pytree returned by :meth:`Task.load_data` and passed explicitly into jitted
functions, so datasets are device arguments rather than constants baked into compiled code.
Batches are sampled inside ``jit`` from a PRNG key.
"""

import abc
import dataclasses
from typing import Any

import chex
import jax

Params = Any
Batch = Any
Data = Any
SPLITS = ("train", "valid")


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
  """An inner training problem for meta-training and evaluation.

  Subclasses are frozen dataclasses whose fields are static configuration (hashable); all
  arrays live in the pytree returned by :meth:`load_data`.
  """

  @property
  def name(self) -> str:
    """A short name for logs and results."""
    return type(self).__name__

  @abc.abstractmethod
  def init_params(self, key: chex.PRNGKey) -> Params:
    """Samples initial parameters (a float pytree)."""

  @abc.abstractmethod
  def loss(self, params: Params, batch: Batch) -> jax.Array:
    """Scalar loss of ``params`` on ``batch``."""

  @abc.abstractmethod
  def sample_batch(self, data: Data, key: chex.PRNGKey, split: str) -> Batch:
    """Samples one batch of ``split`` (``"train"`` or ``"valid"``) inside ``jit``."""

  def load_data(self) -> Data:
    """Loads this task's arrays onto the device (an empty dict for synthetic tasks)."""
    return {}

  def accuracy(self, params: Params, batch: Batch) -> jax.Array | None:
    """Classification accuracy on ``batch``, or ``None`` for tasks without one."""
    del params, batch
    return None


def check_split(split: str) -> None:
  """Raises ValueError for a split name other than ``"train"`` or ``"valid"``."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
