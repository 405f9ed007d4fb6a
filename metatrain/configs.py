"""Meta-training run configurations: a JSON-serialisable :class:`RunConfig` and the named
recipes ``quadratic``, ``digits`` and ``cifar``.

A run config holds two sections, each defined once, where its code lives:
``estimator`` (:class:`metatrain.estimators_lib.EstimatorConfig`: which estimator, particles and
smoothing) and ``truncation`` (:class:`metatrain.truncation_lib.TruncationConfig`: unroll length,
horizons, meta-loss). The learned optimizer's own settings are the ``optimizer`` dict. The
command line reaches any field with a dotted key: ``--set estimator.sigma=0.003``,
``--set truncation.length=50``, ``--set optimizer.hidden_sizes=[16]``.

Configs written before the sections existed (``config.json`` of older runs, the
``training_config`` of older checkpoints) used flat keys (``sigma``, ``truncation_length``, ...);
:meth:`RunConfig.from_dict` reads them (:data:`LEGACY_KEYS`), so those runs resume.
"""

import dataclasses
import json
import warnings
from collections.abc import Mapping
from typing import Any

import optax_learned
from metatrain import estimators as estimators_lib
from metatrain import truncation as truncation_lib

__all__ = ("CONFIGS", "LEGACY_KEYS", "RUN_CONTROL_KEYS", "SECTIONS", "RunConfig", "get_config",
           "nest_legacy_keys")

# The nested sections of a run config and their classes.
SECTIONS = {"estimator": estimators_lib.EstimatorConfig,
            "truncation": truncation_lib.TruncationConfig}

# Flat keys of configs written before the sections existed, and where each one lives now.
LEGACY_KEYS = {
    "estimator": "estimator.name", "merged_es": "estimator.merged_es",
    "num_tasks": "estimator.num_tasks", "num_pairs": "estimator.num_pairs",
    "sigma": "estimator.sigma", "particle_chunk": "estimator.particle_chunk",
    "truncation_length": "truncation.length", "min_horizon": "truncation.min_horizon",
    "max_horizon": "truncation.max_horizon", "meta_loss_split": "truncation.meta_loss_split",
    "log_loss": "truncation.log_loss", "loss_clip": "truncation.loss_clip",
    "divergence_loss": "truncation.divergence_loss",
    "meta_loss_every": "truncation.meta_loss_every", "remat": "truncation.remat",
}

# Keys that steer a run without changing what it computes (up to floating-point rounding, as a
# different device count does): a run may resume with other values.
RUN_CONTROL_KEYS = ("steps", "log_every", "checkpoint_every", "max_to_keep", "description",
                    "estimator.particle_chunk", "truncation.remat")

_DOTTED = ("optimizer", "task_overrides", *SECTIONS)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that determines a meta-training run.

  Attributes:
    task: a task name (see ``metatrain list``), used when ``task_family`` is empty.
    task_family: a task family; ``num_task_variants`` tasks are sampled from it with ``seed``.
    num_task_variants: how many task variations are meta-trained on, one per meta-step in turn.
    task_overrides: fields replaced in the task or family (e.g. ``{"batch_size": 64}``).
    estimator: the estimator section (:class:`~metatrain.estimators_lib.EstimatorConfig`; a dict
      of its fields is accepted).
    truncation: the truncation section (:class:`~metatrain.truncation_lib.TruncationConfig`; a
      dict of its fields is accepted).
    meta_learning_rate: Adam learning rate of the meta-optimizer.
    meta_grad_clip: global-norm clip of meta-gradients before Adam.
    optimizer: fields of :class:`optax_learned.LearnedOptimizer`.
    steps: meta-steps to train in all.
    seed: seeds everything (task variants, inner runs, perturbations).
    log_every: meta-steps between metrics lines.
    checkpoint_every: meta-steps between checkpoints.
    max_to_keep: checkpoints kept.
    description: one line stored with exported optimizers.
    init_from: start from these weights (a bundled name or checkpoint path, e.g. an earlier
      run's export) instead of a fresh initialisation; their optimizer config must equal
      ``optimizer``.
  """
  task: str = "linear_regression"
  task_family: str = ""
  num_task_variants: int = 1
  task_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  estimator: estimators_lib.EstimatorConfig = dataclasses.field(
      default_factory=estimators_lib.EstimatorConfig)
  truncation: truncation_lib.TruncationConfig = dataclasses.field(
      default_factory=truncation_lib.TruncationConfig)
  meta_learning_rate: float = 1e-3
  meta_grad_clip: float = 1.0
  optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)
  steps: int = 1000
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 100
  max_to_keep: int = 3
  description: str = ""
  init_from: str = ""

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in SECTIONS:
        value = _section(field.name, value)
      else:
        value = _checked(field.name, value, field.type)
      object.__setattr__(self, field.name, value)
    try:
      optax_learned.LearnedOptimizer.from_dict(dict(self.optimizer))
    except (TypeError, ValueError) as e:
      raise ValueError(f"optimizer: {e}") from e
    if self.num_task_variants < 1:
      raise ValueError(f"num_task_variants must be >= 1, got {self.num_task_variants}")
    for key in ("steps", "log_every", "checkpoint_every", "max_to_keep"):
      if getattr(self, key) < 1:
        raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict of every key (sections as nested dicts)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
    """Builds a config from :meth:`to_dict`'s form, or from the flat keys of older configs.

    Raises:
      ValueError: an unknown key (naming it and the known ones).
      TypeError: a value of the wrong type (naming its key).
    """
    values = nest_legacy_keys(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)

  def with_overrides(self, assignments: list[str]) -> "RunConfig":
    """Applies ``KEY=VALUE`` strings; values are JSON where they parse, else strings.

    Dotted keys set fields of the sections (``estimator.sigma=0.003``,
    ``truncation.length=50``) and entries of ``optimizer`` and ``task_overrides``. The flat
    keys of older configs (``sigma=0.003``) still work, with a ``DeprecationWarning`` naming
    the new key.

    Raises:
      ValueError: a malformed assignment or an unknown key (naming it).
    """
    values = self.to_dict()
    for assignment in assignments:
      key, sep, text = assignment.partition("=")
      if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
      try:
        value = json.loads(text)
      except json.JSONDecodeError:
        value = text
      if key in LEGACY_KEYS and not (key in SECTIONS and isinstance(value, dict)):
        warnings.warn(f"config key {key!r} is now {LEGACY_KEYS[key]!r}", DeprecationWarning,
                      stacklevel=2)
        key = LEGACY_KEYS[key]
      head, dot, rest = key.partition(".")
      if dot:
        if head not in _DOTTED:
          raise ValueError(f"dotted keys are {', '.join(k + '.*' for k in _DOTTED)}; "
                           f"got {key!r}")
        if head in SECTIONS and rest not in _field_names(SECTIONS[head]):
          raise ValueError(f"unknown config key {key!r}; known keys of {head}: "
                           f"{sorted(_field_names(SECTIONS[head]))}")
        values[head] = {**values[head], rest: value}
      elif key not in values:
        raise ValueError(f"unknown config key {key!r}; known keys: {sorted(values)}")
      else:
        values[key] = value
    return RunConfig.from_dict(values)

  def differences(self, other: "RunConfig") -> dict[str, tuple[Any, Any]]:
    """Keys (other than run-control keys) whose values differ, with both values; section
    fields are named by dotted keys."""
    mine, theirs = _flatten_sections(self.to_dict()), _flatten_sections(other.to_dict())
    return {k: (mine[k], theirs[k]) for k in mine
            if k not in RUN_CONTROL_KEYS and mine[k] != theirs[k]}


def _field_names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def _section(name: str, value: Any):
  """A section's config from itself or from a dict of its fields (type-checked by key)."""
  cls = SECTIONS[name]
  if isinstance(value, cls):
    return value
  if not isinstance(value, Mapping):
    raise TypeError(f"{name} must be a dict of {cls.__name__} fields, got {value!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(value) - set(fields))
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'{name}.{k}' for k in unknown]}; known keys "
                     f"of {name}: {sorted(fields)}")
  return cls(**{k: _checked(f"{name}.{k}", v, fields[k].type) for k, v in value.items()})


def nest_legacy_keys(values: Mapping[str, Any]) -> dict[str, Any]:
  """A config dict with the flat keys of older configs (:data:`LEGACY_KEYS`) moved into their
  sections; dicts already nested come back unchanged (as a copy)."""
  values = dict(values)
  sections = {name: dict(values[name]) for name in SECTIONS
              if isinstance(values.get(name), Mapping)}
  for old, new in LEGACY_KEYS.items():
    if old in values and not (old in SECTIONS and isinstance(values[old], Mapping)):
      section, field = new.split(".")
      sections.setdefault(section, {})[field] = values.pop(old)
  values.update(sections)
  return values


def _flatten_sections(values: dict[str, Any]) -> dict[str, Any]:
  flat = {k: v for k, v in values.items() if k not in SECTIONS}
  for name in SECTIONS:
    flat.update({f"{name}.{k}": v for k, v in values[name].items()})
  return flat


def _checked(name: str, value: Any, expected: Any) -> Any:
  """``value`` if it has the field's type (ints accepted as floats), else a TypeError."""
  if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  kinds = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}
  base = getattr(expected, "__origin__", expected)
  ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
  if not ok:
    raise TypeError(f"{name} must be {kinds.get(base, base.__name__)}, got {value!r}")
  return value


_CIFAR = RunConfig(
    task="cifar_conv_16", task_family="cifar", num_task_variants=16,
    task_overrides={"holdout_size": 5000, "resolutions": [16, 32]},
    estimator=estimators_lib.EstimatorConfig(name="pes", num_tasks=8, num_pairs=2, sigma=0.01),
    truncation=truncation_lib.TruncationConfig(length=20, min_horizon=200, max_horizon=3000,
                                               loss_clip=5.0, divergence_loss=20.0),
    meta_learning_rate=3e-3, optimizer={}, steps=20000, seed=12, log_every=20,
    checkpoint_every=100,
    description="meta-trained on a broad family of small CIFAR-10 ConvNets and MLPs "
                "(validation loss, PES)")

CONFIGS: dict[str, tuple[RunConfig, str]] = {
    "quadratic": (RunConfig(
        task="linear_regression",
        estimator=estimators_lib.EstimatorConfig(name="pes", num_tasks=2, num_pairs=2, sigma=0.01),
        truncation=truncation_lib.TruncationConfig(length=5, min_horizon=20, max_horizon=60,
                                               loss_clip=1e3),
        meta_learning_rate=3e-3, optimizer={"hidden_sizes": [8]}, steps=40, log_every=5,
        checkpoint_every=10, description="linear regression smoke test"),
        "seconds: PES on linear regression with a tiny optimizer (used by tests)"),
    "digits": (RunConfig(
        task="digits_mlp",
        estimator=estimators_lib.EstimatorConfig(name="pes", num_tasks=4, num_pairs=4, sigma=0.01),
        truncation=truncation_lib.TruncationConfig(length=10, min_horizon=50, max_horizon=1000,
                                               loss_clip=5.0),
        meta_learning_rate=3e-3, optimizer={"hidden_sizes": [16]}, steps=1500, log_every=10,
        checkpoint_every=100, description="meta-trained on an MLP on sklearn's 8x8 digits"),
        "about 2 minutes on 2 CPU cores: PES on the digits MLP, validation loss (bundled digits)"),
    "cifar": (_CIFAR,
              "the bundled cifar recipe: PES over a broad CIFAR-10 family (ConvNets with pooled "
              "or flattened heads, with and without normalisation, and MLPs), validation loss"),
    "cifar_growing": (dataclasses.replace(
        _CIFAR,
        truncation=dataclasses.replace(_CIFAR.truncation, max_segments=4, growth_steps=200,
                                       jitter=0.2),
        description="meta-trained on a broad family of small CIFAR-10 ConvNets and MLPs "
                    "(validation loss, PES, truncations growing from 20 to 80 steps)"),
        "experimental (issue #14): the cifar recipe with truncations growing from 20 to 80 "
        "inner steps over 200 meta-steps, jittered 0.8-1.2x"),
    "cifar_late": (dataclasses.replace(
        _CIFAR,
        truncation=dataclasses.replace(_CIFAR.truncation, late_weight_power=2.0),
        description="meta-trained on a broad family of small CIFAR-10 ConvNets and MLPs "
                    "(validation loss weighted by (t / horizon)^2, PES)"),
        "experimental (issue #13): the cifar recipe with each run's validation losses "
        "weighted by (t / horizon)^2, towards the loss at the end of training"),
}


def get_config(name: str) -> RunConfig:
  """A named config.

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  if name not in CONFIGS:
    raise ValueError(f"unknown config {name!r}; known configs: {sorted(CONFIGS)}")
  return CONFIGS[name][0]
