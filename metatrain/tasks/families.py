"""Named tasks and task families: distributions over task variations for meta-training.

:func:`get_task` builds a named task with optional field overrides; :func:`get_family` builds
a :class:`TaskFamily` whose :meth:`~TaskFamily.sample` draws a task variation (architecture,
activation, initialisation scale, batch size, ...) deterministically from a seed or PRNG key.
Sampling happens on the host with numpy; tasks of a family that share a resolution share
their (cached) device data.
"""

import abc
import dataclasses
import math
from collections.abc import Callable

import chex
import jax
import numpy as np

from metatrain.tasks import base
from metatrain.tasks.cifar import MLPTask
from metatrain.tasks.convnet import ConvNetTask
from metatrain.tasks.digits import DigitsMLPTask
from metatrain.tasks.quadratic import LinearRegressionTask

_TASKS: dict[str, tuple[Callable[[], base.Task], str]] = {
    "linear_regression": (LinearRegressionTask,
                          "least squares, 8 Gaussian features, condition number 10"),
    "digits_mlp": (DigitsMLPTask, "MLP 64-32-10 (relu) on sklearn's 8x8 digits, batch 64"),
    "cifar_conv_8": (lambda: ConvNetTask(resolution=8),
                     "3x32 strided ConvNet on CIFAR-10 pooled to 8x8, batch 128"),
    "cifar_conv_16": (lambda: ConvNetTask(resolution=16),
                      "3x32 strided ConvNet on CIFAR-10 pooled to 16x16, batch 128"),
    "cifar_conv_32": (lambda: ConvNetTask(resolution=32),
                      "3x32 strided ConvNet on CIFAR-10 at 32x32 (Metz et al. 2019), batch 128"),
    "cifar_conv_32_w64": (lambda: ConvNetTask(resolution=32, width=64),
                          "3x64 strided ConvNet on CIFAR-10 at 32x32, batch 128"),
}


def task_names() -> dict[str, str]:
  """Returns the registered task names, each with a one-line description."""
  return {name: description for name, (_, description) in _TASKS.items()}


def get_task(name: str, **overrides) -> base.Task:
  """Builds a registered task, replacing any of its fields with ``overrides``.

  Args:
    name: a key of :func:`task_names`.
    **overrides: dataclass fields of the task, e.g. ``batch_size=32`` or ``data_dir=...``.

  Returns:
    The task.

  Raises:
    ValueError: an unknown name, or an override that is not a field of the task.
  """
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {sorted(_TASKS)}")
  return _replace(_TASKS[name][0](), overrides)


def _replace(task: base.Task, overrides: dict) -> base.Task:
  fields = {f.name for f in dataclasses.fields(task)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"{type(task).__name__} has no field(s) {unknown}; fields: {sorted(fields)}")
  return dataclasses.replace(task, **overrides)


def _rng(key_or_seed: int | chex.PRNGKey) -> np.random.Generator:
  """A numpy generator determined by an integer seed or a (typed or raw) JAX PRNG key."""
  if isinstance(key_or_seed, (int, np.integer)):
    return np.random.default_rng(int(key_or_seed))
  if jax.dtypes.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key):
    key_or_seed = jax.random.key_data(key_or_seed)
  return np.random.default_rng(np.asarray(key_or_seed, np.uint32).ravel().tolist())


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
  """A log-uniform draw, rounded to 4 significant digits for readable, stable task fields."""
  value = math.exp(rng.uniform(math.log(low), math.log(high)))
  return float(f"{value:.4g}")


def _choice(rng: np.random.Generator, options: tuple):
  return options[int(rng.integers(len(options)))]


@dataclasses.dataclass(frozen=True)
class TaskFamily(abc.ABC):
  """A distribution over tasks; :meth:`sample` is deterministic given its seed or key."""

  @abc.abstractmethod
  def sample(self, key_or_seed: int | chex.PRNGKey) -> base.Task:
    """Draws one task variation from an integer seed or a JAX PRNG key."""


@dataclasses.dataclass(frozen=True)
class LinearRegressionFamily(TaskFamily):
  """Least-squares problems of varying dimension, conditioning and true weights."""
  dims: tuple[int, ...] = (4, 8, 16, 32, 64)
  condition_range: tuple[float, float] = (1.0, 1e3)
  batch_sizes: tuple[int, ...] = (16, 32, 64)

  def sample(self, key_or_seed: int | chex.PRNGKey) -> LinearRegressionTask:
    rng = _rng(key_or_seed)
    return LinearRegressionTask(
        dim=_choice(rng, self.dims), batch_size=_choice(rng, self.batch_sizes),
        condition_number=_log_uniform(rng, *self.condition_range),
        seed=int(rng.integers(2**31)))


@dataclasses.dataclass(frozen=True)
class DigitsMLPFamily(TaskFamily):
  """Digits MLPs of varying depth, widths, activation, initialisation and batch size."""
  depths: tuple[int, ...] = (0, 1, 2, 3)
  widths: tuple[int, ...] = (16, 32, 64, 128)
  activations: tuple[str, ...] = ("relu", "tanh", "gelu", "elu")
  init_scale_range: tuple[float, float] = (0.5, 2.0)
  batch_sizes: tuple[int, ...] = (32, 64, 128)

  def sample(self, key_or_seed: int | chex.PRNGKey) -> DigitsMLPTask:
    rng = _rng(key_or_seed)
    depth = _choice(rng, self.depths)
    return DigitsMLPTask(
        hidden_sizes=tuple(_choice(rng, self.widths) for _ in range(depth)),
        activation=_choice(rng, self.activations),
        init_scale=_log_uniform(rng, *self.init_scale_range),
        batch_size=_choice(rng, self.batch_sizes))


@dataclasses.dataclass(frozen=True)
class ConvNetFamily(TaskFamily):
  """CIFAR-10 ConvNets of varying width, depth, activation, init, batch size and resolution.

  Data is loaded once per resolution (cached), however many variations are sampled. With
  ``holdout_size > 0`` the last rows of the training split are kept out of meta-training
  altogether, for evaluating the meta-trained optimizer on unseen validation data.
  """
  widths: tuple[int, ...] = (16, 32, 64)
  depths: tuple[int, ...] = (2, 3, 4)
  activations: tuple[str, ...] = ("relu", "tanh", "gelu", "elu")
  init_scale_range: tuple[float, float] = (0.5, 2.0)
  batch_sizes: tuple[int, ...] = (64, 128)
  resolutions: tuple[int, ...] = (8, 16, 32)
  conv_impl: str = "auto"
  data_dir: str | None = None
  validation_size: int = 5000
  holdout_size: int = 0

  def sample(self, key_or_seed: int | chex.PRNGKey) -> ConvNetTask:
    rng = _rng(key_or_seed)
    return ConvNetTask(
        width=_choice(rng, self.widths), depth=_choice(rng, self.depths),
        activation=_choice(rng, self.activations),
        init_scale=_log_uniform(rng, *self.init_scale_range),
        batch_size=_choice(rng, self.batch_sizes), resolution=_choice(rng, self.resolutions),
        conv_impl=self.conv_impl, data_dir=self.data_dir, validation_size=self.validation_size,
        holdout_size=self.holdout_size)


@dataclasses.dataclass(frozen=True)
class CifarFamily(TaskFamily):
  """CIFAR-10 classifiers of many kinds: ConvNets with pooled or flattened heads, with or
  without normalisation, of varying width and depth, and MLPs on pixels of varying widths.

  The breadth is what lets one learned optimizer serve the models users write (the
  per-tensor network sees tensors of many shapes, scales and roles). ``mlp_fraction`` of the
  samples are MLPs.
  """
  mlp_fraction: float = 0.3
  widths: tuple[int, ...] = (16, 32, 64)
  depths: tuple[int, ...] = (2, 3)
  heads: tuple[str, ...] = ("pool", "flatten")
  norms: tuple[bool, ...] = (False, True)
  mlp_widths: tuple[int, ...] = (64, 128, 256, 512)
  mlp_depths: tuple[int, ...] = (1, 2)
  activations: tuple[str, ...] = ("relu", "gelu", "tanh")
  init_scale_range: tuple[float, float] = (0.5, 2.0)
  batch_sizes: tuple[int, ...] = (32, 64, 128)
  resolutions: tuple[int, ...] = (8, 16)
  conv_impl: str = "auto"
  data_dir: str | None = None
  validation_size: int = 5000
  holdout_size: int = 0

  def sample(self, key_or_seed: int | chex.PRNGKey) -> base.Task:
    rng = _rng(key_or_seed)
    shared = dict(activation=_choice(rng, self.activations),
                  init_scale=_log_uniform(rng, *self.init_scale_range),
                  batch_size=_choice(rng, self.batch_sizes),
                  resolution=_choice(rng, self.resolutions), data_dir=self.data_dir,
                  validation_size=self.validation_size, holdout_size=self.holdout_size)
    if rng.uniform() < self.mlp_fraction:
      depth = _choice(rng, self.mlp_depths)
      return MLPTask(hidden_sizes=tuple(_choice(rng, self.mlp_widths) for _ in range(depth)),
                     **shared)
    return ConvNetTask(width=_choice(rng, self.widths), depth=_choice(rng, self.depths),
                       head=_choice(rng, self.heads), norm=bool(_choice(rng, self.norms)),
                       conv_impl=self.conv_impl, **shared)


_FAMILIES: dict[str, type[TaskFamily]] = {
    "linear_regression": LinearRegressionFamily,
    "digits_mlp": DigitsMLPFamily,
    "cifar_conv": ConvNetFamily,
    "cifar": CifarFamily,
}


def family_names() -> tuple[str, ...]:
  """Returns the registered family names."""
  return tuple(_FAMILIES)


def get_family(name: str, **overrides) -> TaskFamily:
  """Builds a registered task family, replacing any of its fields with ``overrides``.

  Args:
    name: one of :func:`family_names`.
    **overrides: dataclass fields of the family, e.g. ``resolutions=(16,)``.

  Returns:
    The family.

  Raises:
    ValueError: an unknown name, or an override that is not a field of the family.
  """
  if name not in _FAMILIES:
    raise ValueError(f"unknown task family {name!r}; known families: {sorted(_FAMILIES)}")
  return _replace(_FAMILIES[name](), overrides)


def with_data_dir(task_or_family, data_dir: str | None):
  """``task_or_family`` pointed at ``data_dir`` when it reads a dataset and one is given.

  Tasks and families without a ``data_dir`` field (linear regression, digits) are returned
  unchanged, so one ``--data-dir`` option serves every task.
  """
  if data_dir is None or "data_dir" not in {f.name for f in dataclasses.fields(task_or_family)}:
    return task_or_family
  return dataclasses.replace(task_or_family, data_dir=data_dir)


def build_tasks(task: str, *, family: str = "", num_variants: int = 1,
                overrides: dict | None = None, seed: int = 0,
                data_dir: str | None = None) -> list[base.Task]:
  """The tasks of a meta-training run: one named task, or samples of a task family.

  Args:
    task: a name of :func:`task_names`, used when ``family`` is empty.
    family: a name of :func:`family_names`; ``num_variants`` tasks are sampled from it, the
      ``i``-th with seed ``seed * 1000 + i``.
    num_variants: how many tasks to sample from ``family``.
    overrides: fields replaced in the task or family (lists become tuples).
    seed: seeds the family's samples.
    data_dir: where datasets are, for tasks that read one (``None``: their default).

  Returns:
    The tasks, in meta-training order.

  Raises:
    ValueError: an unknown task or family, or an override that is not one of its fields.
  """
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()}
  if family:
    sampler = with_data_dir(get_family(family, **fields), data_dir)
    return [sampler.sample(seed * 1000 + i) for i in range(num_variants)]
  return [with_data_dir(get_task(task, **fields), data_dir)]
