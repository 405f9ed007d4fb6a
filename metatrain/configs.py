"""Meta-training run configurations: a flat, JSON-serialisable :class:`RunConfig` and the
named recipes ``quadratic``, ``digits`` and ``cifar``.

Keys are flat so that the command line can set any of them (``--set sigma=0.003``); the
learned optimizer's own settings are under ``optimizer`` (``--set optimizer.hidden_sizes=[16]``).
"""

import dataclasses
import json
from typing import Any

import optax_learned
from metatrain import estimators, truncation

__all__ = ("CONFIGS", "RUN_CONTROL_KEYS", "RunConfig", "get_config")

# Keys that steer a run without changing what it computes (up to floating-point rounding, as a
# different device count does): a run may resume with other values.
RUN_CONTROL_KEYS = ("steps", "log_every", "checkpoint_every", "max_to_keep", "description",
                    "particle_chunk", "remat")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that determines a meta-training run.

  Attributes:
    task: a task name (see ``metatrain list``), used when ``task_family`` is empty.
    task_family: a task family; ``num_task_variants`` tasks are sampled from it with ``seed``.
    num_task_variants: how many task variations are meta-trained on, one per meta-step in turn.
    task_overrides: fields replaced in the task or family (e.g. ``{"batch_size": 64}``).
    estimator: ``pathwise``, ``es``, ``pes`` or ``merged``.
    merged_es: the ES side of ``merged``: ``es`` or ``pes``.
    num_tasks: task instances per meta-step (own initialisation, data and horizon).
    num_pairs: antithetic pairs per task instance.
    sigma: Gaussian smoothing scale on the optimizer weights.
    truncation_length: inner steps per meta-step.
    min_horizon: shortest inner run (steps).
    max_horizon: longest inner run; log-uniform between the two.
    meta_loss_split: ``valid`` or ``train``.
    log_loss: meta-train on log losses.
    loss_clip: per-step loss clip before the log.
    divergence_loss: a training loss above this resets the inner run (counted).
    meta_loss_every: measure the meta-loss after every this many inner steps (a divisor of
      ``truncation_length``); larger values skip validation passes.
    remat: recompute inner steps in the backward pass (``jax.checkpoint``): less memory for
      ``pathwise`` and ``merged``.
    particle_chunk: particles vectorised together, the chunks run in turn (0: all at once);
      with several devices, a multiple of their count. Speed and memory only. -1 (the
      default) picks by backend: one particle per device at a time (``lax.map``) on CPU,
      where that measured faster for ConvNets, and all at once (``vmap``) on GPU and TPU.
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
  estimator: str = "pes"
  merged_es: str = "pes"
  num_tasks: int = 8
  num_pairs: int = 8
  sigma: float = 0.01
  truncation_length: int = 20
  min_horizon: int = 200
  max_horizon: int = 2000
  meta_loss_split: str = "valid"
  log_loss: bool = True
  loss_clip: float = 5.0
  divergence_loss: float = 1e4
  meta_loss_every: int = 1
  remat: bool = False
  particle_chunk: int = -1
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
      object.__setattr__(self, field.name, _checked(field.name, getattr(self, field.name),
                                                    field.type))
    try:
      optax_learned.LearnedOptimizer.from_dict(dict(self.optimizer))
    except (TypeError, ValueError) as e:
      raise ValueError(f"optimizer: {e}") from e
    if self.particle_chunk < -1:
      raise ValueError(f"particle_chunk must be -1 (automatic), 0 or positive, got "
                       f"{self.particle_chunk}")
    # Validates the estimator and truncation settings without resolving particle_chunk=-1,
    # which would start JAX's backend (before jax.distributed.initialize may be called).
    self.estimator_config(resolve_particle_chunk=False)
    if self.num_task_variants < 1:
      raise ValueError(f"num_task_variants must be >= 1, got {self.num_task_variants}")
    for key in ("steps", "log_every", "checkpoint_every", "max_to_keep"):
      if getattr(self, key) < 1:
        raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

  @property
  def resolved_particle_chunk(self) -> int:
    """``particle_chunk``, with -1 resolved for this process's backend and devices."""
    if self.particle_chunk != -1:
      return self.particle_chunk
    import jax  # noqa: PLC0415 (configs is imported by `metatrain list`, which needs no jax)
    return jax.device_count() if jax.default_backend() == "cpu" else 0

  def estimator_config(self, resolve_particle_chunk: bool = True
                       ) -> estimators.EstimatorConfig:
    """The estimator settings of this run (``particle_chunk=-1`` resolved, unless not
    ``resolve_particle_chunk``: then it counts as 0)."""
    chunk = (self.resolved_particle_chunk if resolve_particle_chunk
             else max(self.particle_chunk, 0))
    return estimators.EstimatorConfig(
        estimator=self.estimator, merged_es=self.merged_es, num_tasks=self.num_tasks,
        num_pairs=self.num_pairs, sigma=self.sigma, particle_chunk=chunk,
        truncation=truncation.TruncationConfig(
            truncation_length=self.truncation_length, min_horizon=self.min_horizon,
            max_horizon=self.max_horizon, meta_loss_split=self.meta_loss_split,
            log_loss=self.log_loss, loss_clip=self.loss_clip,
            divergence_loss=self.divergence_loss, meta_loss_every=self.meta_loss_every,
            remat=self.remat))

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict of every key."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
    """Builds a config, rejecting unknown keys by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)

  def with_overrides(self, assignments: list[str]) -> "RunConfig":
    """Applies ``KEY=VALUE`` strings; values are JSON where they parse, else strings.

    ``optimizer.NAME=VALUE`` and ``task_overrides.NAME=VALUE`` set entries of those dicts.

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
      head, dot, rest = key.partition(".")
      if dot:
        if head not in ("optimizer", "task_overrides"):
          raise ValueError(f"only optimizer.* and task_overrides.* take dotted keys, got {key!r}")
        values[head] = {**values[head], rest: value}
      elif key not in values:
        raise ValueError(f"unknown config key {key!r}; known keys: {sorted(values)}")
      else:
        values[key] = value
    return RunConfig.from_dict(values)

  def differences(self, other: "RunConfig") -> dict[str, tuple[Any, Any]]:
    """Keys (other than run-control keys) whose values differ, with both values."""
    mine, theirs = self.to_dict(), other.to_dict()
    return {k: (mine[k], theirs[k]) for k in mine
            if k not in RUN_CONTROL_KEYS and mine[k] != theirs[k]}


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


CONFIGS: dict[str, tuple[RunConfig, str]] = {
    "quadratic": (RunConfig(
        task="linear_regression", estimator="pes", num_tasks=2, num_pairs=2, sigma=0.01,
        truncation_length=5, min_horizon=20, max_horizon=60, loss_clip=1e3,
        meta_learning_rate=3e-3, optimizer={"hidden_sizes": [8]}, steps=40, log_every=5,
        checkpoint_every=10, description="linear regression smoke test"),
        "seconds: PES on linear regression with a tiny optimizer (used by tests)"),
    "digits": (RunConfig(
        task="digits_mlp", estimator="pes", num_tasks=4, num_pairs=4, sigma=0.01,
        truncation_length=10, min_horizon=50, max_horizon=1000, loss_clip=5.0,
        meta_learning_rate=3e-3, optimizer={"hidden_sizes": [16]}, steps=1500, log_every=10,
        checkpoint_every=100, description="meta-trained on an MLP on sklearn's 8x8 digits"),
        "about 2 minutes on 2 CPU cores: PES on the digits MLP, validation loss (bundled digits)"),
    "cifar": (RunConfig(
        task="cifar_conv_16", task_family="cifar", num_task_variants=16,
        task_overrides={"holdout_size": 5000, "resolutions": [16, 32]},
        estimator="pes", num_tasks=8, num_pairs=2, sigma=0.01,
        truncation_length=20, min_horizon=200, max_horizon=3000, loss_clip=5.0,
        divergence_loss=20.0, meta_learning_rate=3e-3, optimizer={},
        steps=20000, seed=12, log_every=20, checkpoint_every=100,
        description="meta-trained on a broad family of small CIFAR-10 ConvNets and MLPs "
                    "(validation loss, PES)"),
        "the bundled cifar recipe: PES over a broad CIFAR-10 family (ConvNets with pooled "
        "or flattened heads, with and without normalisation, and MLPs), validation loss"),
}


def get_config(name: str) -> RunConfig:
  """A named config.

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  if name not in CONFIGS:
    raise ValueError(f"unknown config {name!r}; known configs: {sorted(CONFIGS)}")
  return CONFIGS[name][0]
