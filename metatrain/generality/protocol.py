"""The generality protocol: train suite models with a learned optimizer and tuned Adam.

Every run trains one :data:`~metatrain.generality.models.SUITE` model in a plain jitted Flax
loop (batches sampled inside ``jit``, BatchNorm statistics as mutable ``batch_stats``) from a
seed, records each step's minibatch loss, the loss on a fixed set of training rows every
``train_eval_every`` steps and the validation loss at fixed steps, and is cached as JSON
under the output directory, so an interrupted suite resumes and Adam's grid is computed
once for every learned optimizer compared against it. Validation rows are never used in
meta-training: for CIFAR-10 they are the last ``HOLDOUT_ROWS`` rows of the training split,
which the ``cifar`` recipe holds out; seeds start at ``FIRST_SEED``.
"""

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_learned
from metatrain import data as data_lib
from metatrain import timing
from metatrain._json_io import atomic_write
from metatrain.generality.models import SUITE, SuiteModel

__all__ = ("HOLDOUT_ROWS", "ProtocolConfig", "load_dataset", "optimizer_fingerprint",
           "run_cached", "step_cost_ratio")

HOLDOUT_ROWS = 5000
FIRST_SEED = 1000
TEXT_CONTEXT = 32
# A loss above this (or a non-finite one) ends a run as diverged.
DIVERGENCE_LOSS = 1e3
_MEAN = np.array([125.3, 122.9, 113.9], np.float32)
_STD = np.array([63.0, 62.1, 66.7], np.float32)
# Standard-library modules whose source forms the character-level corpus (fixed per Python).
_TEXT_MODULES = ("argparse", "textwrap", "json.decoder", "json.encoder", "csv", "difflib",
                 "fractions", "shlex", "string", "calendar", "heapq", "bisect")


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
  """How the suite is run.

  Attributes:
    steps: the longest horizon; shorter horizons are read from the same runs (neither
      constant-rate Adam nor the learned optimizer knows the horizon).
    horizons: the horizons reported.
    seeds: evaluation seeds (``FIRST_SEED + i``).
    adam_learning_rates: Adam's grid.
    eval_every: steps between validation measurements (and at the end).
    eval_rows: validation rows evaluated (the first ones of the validation split).
    smoothing: window of the training-loss mean (steps).
    train_eval_every: steps between measurements of the loss on a fixed set of training
      rows, from which the late rise is read. (The minibatch loss's ``smoothing``-step mean
      depends on which batches came last: with the same batches, tuned Adam's final mean
      is up to 12% above its best one.)
    train_eval_rows: training rows of that set (the first ones of the training split, in
      evaluation mode).
    timing_reps: interleaved timing calls of each optimizer's step.
  """
  steps: int = 3000
  horizons: tuple[int, ...] = (1000, 3000)
  seeds: int = 3
  adam_learning_rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
  eval_every: int = 500
  eval_rows: int = 5000
  smoothing: int = 50
  train_eval_every: int = 100
  train_eval_rows: int = 2000
  timing_reps: int = 60

  def __post_init__(self):
    for name in ("steps", "seeds", "eval_every", "eval_rows", "smoothing", "train_eval_every",
                 "train_eval_rows", "timing_reps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
    if max(self.horizons) > self.steps or min(self.horizons) < self.smoothing:
      raise ValueError(f"horizons {self.horizons} must lie in [smoothing={self.smoothing}, "
                       f"steps={self.steps}]")
    if any(h % self.eval_every for h in self.horizons):
      raise ValueError(f"every horizon {self.horizons} must be a multiple of eval_every "
                       f"({self.eval_every}), so that it has a validation measurement")
    if any(h % self.train_eval_every for h in self.horizons):
      raise ValueError(f"every horizon {self.horizons} must be a multiple of "
                       f"train_eval_every ({self.train_eval_every}), so that it has a "
                       "training-loss measurement")


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str | None = None) -> dict[str, dict[str, jax.Array]]:
  """A suite dataset on the device: ``{"train": {"x", "y"}, "valid": {"x", "y"}}``.

  Args:
    name: ``"cifar10"`` (float images normalised per channel; validation on the last
      ``HOLDOUT_ROWS`` training rows), ``"text"`` (byte-level standard-library source;
      the last 10% is validation) or ``"digits"`` (sklearn; the last 20%).
    data_dir: the CIFAR-10 source (``None``: ``$OPTAX_LEARNED_DATA``, else TFDS).

  Raises:
    ValueError: an unknown dataset name.
  """
  if name == "cifar10":
    splits = data_lib.load_cifar10(data_dir, validation_size=5000, holdout_size=HOLDOUT_ROWS)
    pick = lambda split: {"x": jnp.asarray(split["image"]),
                          "y": jnp.asarray(split["label"], jnp.int32)}
    return {"train": pick(splits["train"]), "valid": pick(splits["holdout"])}
  if name == "text":
    import importlib  # noqa: PLC0415
    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in _TEXT_MODULES)
    codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32) % 128
    cut = int(0.9 * len(codes))
    return {"train": {"x": jnp.asarray(codes[:cut])}, "valid": {"x": jnp.asarray(codes[cut:])}}
  if name == "digits":
    from sklearn.datasets import load_digits  # noqa: PLC0415
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    cut = int(0.8 * len(y))
    return {"train": {"x": jnp.asarray(x[:cut]), "y": jnp.asarray(y[:cut])},
            "valid": {"x": jnp.asarray(x[cut:]), "y": jnp.asarray(y[cut:])}}
  raise ValueError(f"unknown suite dataset {name!r}; known: cifar10, text, digits")


def _batch(model: SuiteModel, split: dict[str, jax.Array], key: jax.Array,
           size: int | None = None, start: jax.Array | None = None):
  """Inputs and targets of a batch: random rows (``key``) or rows from ``start``."""
  size = model.batch_size if size is None else size
  if model.dataset == "text":
    if start is None:
      start = jax.random.randint(key, (size,), 0, split["x"].shape[0] - TEXT_CONTEXT - 1)
    else:
      start = start + jnp.arange(size) * TEXT_CONTEXT
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice(split["x"], (s,), (TEXT_CONTEXT + 1,)))(
        start)
    return windows[:, :-1], windows[:, 1:]
  index = (jax.random.randint(key, (size,), 0, split["y"].shape[0]) if start is None
           else start + jnp.arange(size))
  x = split["x"][index]
  if model.dataset == "cifar10":
    x = (x.astype(jnp.float32) - _MEAN) / _STD
  return x, split["y"][index]


def _loss(module, variables, x, y, train: bool):
  """Mean cross-entropy, and the new BatchNorm statistics when training."""
  mutable = ["batch_stats"] if train and "batch_stats" in variables else False
  out = module.apply(variables, x, train=train, mutable=mutable)
  logits, new_state = out if mutable else (out, {})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, new_state


class _Run:
  """A model, its data and one optimizer: init, a jitted train step, validation."""

  def __init__(self, model: SuiteModel, tx: optax.GradientTransformation, seed: int,
               data_dir: str | None):
    self.model, self.tx = model, tx
    self.data = load_dataset(model.dataset, data_dir)
    vocab = {"vocab_size": 128} if model.dataset == "text" else {}
    self.module = model.make(**vocab)
    init_key, self.key = jax.random.split(jax.random.key(seed))
    x, _ = _batch(model, self.data["train"], init_key)
    variables = self.module.init(init_key, x[:2], train=False)
    self.params = variables["params"]
    self.extra = {k: v for k, v in variables.items() if k != "params"}
    self.opt_state = tx.init(self.params)

    def step(params, extra, opt_state, key):
      x, y = _batch(model, self.data["train"], key)
      def loss_fn(p):
        return _loss(self.module, {"params": p, **extra}, x, y, train=True)
      (loss, new_extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), {**extra, **new_extra}, opt_state, loss

    self.step = jax.jit(step, donate_argnums=(0, 1, 2))

  def train_step(self, key):
    self.params, self.extra, self.opt_state, loss = self.step(
        self.params, self.extra, self.opt_state, key)
    return loss

  def evaluation_loss(self, split: str, rows: int) -> float:
    """The mean loss in evaluation mode on the first ``rows`` rows of ``split``."""
    data = self.data[split]
    num = data["x"].shape[0]
    if self.model.dataset == "text":
      size = min(rows // TEXT_CONTEXT, (num - 1) // TEXT_CONTEXT) or 1
    else:
      size = min(rows, num)
    return float(_evaluate(self.module, self.model, data, self.params, self.extra, size))


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _evaluate(module, model, data, params, extra, size):
  chunk = 500 if model.dataset != "text" else 64
  total, count = 0.0, 0
  for start in range(0, size, chunk):
    n = min(chunk, size - start)
    offset = start * (TEXT_CONTEXT if model.dataset == "text" else 1)
    x, y = _batch(model, data, None, n, jnp.asarray(offset))
    loss, _ = _loss(module, {"params": params, **extra}, x, y, train=False)
    total, count = total + loss * n, count + n
  return total / count


def train(model: SuiteModel, tx: optax.GradientTransformation, seed: int,
          config: ProtocolConfig, data_dir: str | None = None) -> dict[str, Any]:
  """One training run.

  Returns:
    ``{"train_losses": [steps] (NaN after a divergence), "train_eval_losses": {step: loss}
    (on the fixed training rows), "valid_losses": {step: loss}, "diverged": bool,
    "seconds": float}``.
  """
  run = _Run(model, tx, seed, data_dir)
  losses, train_eval, valid, diverged = [], {}, {}, False
  start = time.perf_counter()
  for step in range(1, config.steps + 1):
    losses.append(run.train_step(jax.random.fold_in(run.key, step)))
    if step % config.eval_every == 0 or step == config.steps:
      recent = np.asarray(jax.device_get(losses[-config.eval_every:]))
      if not np.all(np.isfinite(recent)) or np.max(recent) > DIVERGENCE_LOSS:
        diverged = True
        break
      valid[str(step)] = run.evaluation_loss("valid", config.eval_rows)
    if step % config.train_eval_every == 0:
      train_eval[str(step)] = run.evaluation_loss("train", config.train_eval_rows)
  train_losses = np.full(config.steps, np.nan)
  got = np.asarray(jax.device_get(losses), np.float64)
  train_losses[:len(got)] = got
  if diverged:
    train_losses[len(got) - config.eval_every:] = np.nan
  return {"train_losses": train_losses.tolist(), "train_eval_losses": train_eval,
          "valid_losses": valid, "diverged": diverged,
          "seconds": time.perf_counter() - start}


def run_cached(out_dir: pathlib.Path, model: SuiteModel, label: str,
               tx: optax.GradientTransformation, seed: int, config: ProtocolConfig,
               data_dir: str | None = None, fingerprint: str | None = None) -> dict[str, Any]:
  """:func:`train`, cached as ``out_dir/runs/<model>/<label>_seed<seed>.json``.

  A cached run is reused when its steps and evaluation settings match ``config``, the
  model's source code and batch size are unchanged, and so is ``fingerprint``, if given
  (for a learned optimizer, :func:`optimizer_fingerprint`: a re-exported checkpoint under
  the same label is run again). ``label`` must name the optimizer and its settings
  uniquely (Adam's runs are labelled by learning rate).
  """
  path = out_dir / "runs" / model.name / f"{label}_seed{seed}.json"
  source = inspect.getsource(model.make) + repr((model.dataset, model.batch_size))
  key = {"steps": config.steps, "eval_every": config.eval_every,
         "eval_rows": config.eval_rows, "train_eval_every": config.train_eval_every,
         "train_eval_rows": config.train_eval_rows,
         "model": hashlib.sha256(source.encode()).hexdigest()[:16]}
  if fingerprint is not None:
    key["optimizer"] = fingerprint
  if not (path.is_file() and json.loads(path.read_text()).get("protocol") == key):
    result = train(model, tx, seed, config, data_dir)
    stored = {**result, "protocol": key,
              "train_losses": [None if not np.isfinite(v) else round(v, 5)
                               for v in result["train_losses"]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(stored))
  # Always the stored (rounded) run, so that a fresh and a cached run summarise alike.
  cached = json.loads(path.read_text())
  cached["train_losses"] = [np.nan if v is None else v for v in cached["train_losses"]]
  return cached


def optimizer_fingerprint(lopt: optax_learned.LearnedOptimizer, meta_params: Any) -> str:
  """A short hash of a learned optimizer's config, weights and update rule.

  Args:
    lopt: the optimizer's config, as :func:`optax_learned.load_weights` returns it.
    meta_params: its weights.

  Returns:
    16 hex digits that change when the config, any weight, or the package version does
    (the version changes whenever the update rule does: the same weights then make another
    optimizer).
  """
  digest = hashlib.sha256(json.dumps(lopt.to_dict(), sort_keys=True).encode())
  digest.update(optax_learned.__version__.encode())
  for leaf in jax.tree.leaves(meta_params):
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def step_cost_ratio(model: SuiteModel, txs: dict[str, optax.GradientTransformation],
                    reps: int, data_dir: str | None = None) -> dict[str, float]:
  """Median step time of each optimizer over the first's, timed interleaved in one process."""
  runs = {name: _Run(model, tx, FIRST_SEED, data_dir) for name, tx in txs.items()}
  key = jax.random.key(0)
  thunks = {name: (lambda run=run: run.train_step(key)) for name, run in runs.items()}
  times = timing.interleaved_times(thunks, reps=reps, warmup=5)
  first = next(iter(txs))
  return {name: times[name][0] / times[first][0] for name in txs} | {
      f"{first}_ms": times[first][0] * 1e3}


def suite_models(names: str | None) -> list[SuiteModel]:
  """The suite's models, or those named in a comma-separated list."""
  if not names:
    return list(SUITE.values())
  unknown = sorted(set(names.split(",")) - set(SUITE))
  if unknown:
    raise ValueError(f"unknown suite model(s) {unknown}; known: {sorted(SUITE)}")
  return [SUITE[name] for name in names.split(",")]


def data_dir_from_env() -> str | None:
  """The CIFAR-10 directory of ``$OPTAX_LEARNED_DATA``, if set."""
  return os.environ.get(data_lib.ENV_VAR) or None
