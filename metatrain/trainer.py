"""The meta-training loop: resumable, observable and sharded over devices.

A run lives in a work directory::

  workdir/
    config.json      # the RunConfig; a resume with a different config is refused
    metrics.jsonl    # one JSON object per logged meta-step
    metrics.png      # the curves, redrawn at every checkpoint
    checkpoints/     # Orbax CheckpointManager: everything needed to continue

Each meta-step is one jitted function: estimate the meta-gradient, skip it if it is not
finite (counted), else apply clipped Adam. Randomness derives from ``(seed, step)`` only, so
a run interrupted at any point and resumed from its last checkpoint computes exactly what an
uninterrupted run computes. The particle axis of the estimator states (task instances times
antithetic pairs) is sharded over all devices of a 1-D mesh; on many hosts call
``jax.distributed.initialize()`` first (``metatrain train --distributed``) and the mesh spans
every host's devices.
"""

import contextlib
import fcntl
import functools
import json
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optax_learned
from metatrain import estimators, plots
from metatrain import truncation as truncation_lib
from metatrain._json_io import atomic_write, jsonable
from metatrain.configs import RunConfig
from metatrain.tasks import base, build_tasks

__all__ = ("Counters", "Interrupted", "MetaTrainState", "MetaTrainer", "WorkdirError",
           "export", "restore_on_this_host", "run_tasks", "workdir_lock")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
_SCHEDULE_STREAM = 0x7E6  # folded into a meta-step's key for its truncation-length jitter


class WorkdirError(RuntimeError):
  """A work directory that cannot be used: unwritable, in use, or holding another run."""


class Interrupted(Exception):  # noqa: N818 (it is not an error: the user asked for it)
  """Meta-training stopped by the user (Ctrl-C); rerunning the same command resumes.

  Attributes:
    checkpoint_step: the step of the last finished checkpoint (where a rerun resumes).
    step: the meta-steps done when the interrupt arrived.
  """

  def __init__(self, checkpoint_step: int, step: int):
    super().__init__(f"interrupted at step {step}; the last checkpoint is step "
                     f"{checkpoint_step}: rerun the same command to resume")
    self.checkpoint_step, self.step = checkpoint_step, step


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
  """Holds an exclusive lock on ``workdir`` for one writer (one per host).

  The lock is an ``fcntl`` lock on ``workdir/.lock``: the operating system releases it when
  its process ends, however it ends (``kill -9`` included), so a lock left by a killed run
  never blocks the resume.

  Raises:
    WorkdirError: another process holds the lock (naming its PID when it is known).
  """
  path = workdir / (LOCK_FILE if jax.process_count() == 1
                    else f"{LOCK_FILE}.{jax.process_index()}")
  with open(path, "a+") as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "unknown"
      raise WorkdirError(f"{workdir} is in use by another metatrain process (PID {holder}); "
                         "wait for it to finish, or stop it, before training here") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _sigint_deferred():
  """Holds a Ctrl-C (SIGINT) that arrives inside the block until the block has finished.

  Orbax's ``CheckpointManager.save`` starts background threads before it registers the save
  for ``wait_until_finished``; a ``KeyboardInterrupt`` raised between the two leaves a thread
  writing while the interpreter shuts down. Deferring the signal around the call makes each
  save all-or-nothing from the user's side. Off the main thread (where Python cannot install
  signal handlers) the block runs unchanged.

  Raises:
    KeyboardInterrupt: on leaving the block, when SIGINT arrived inside it and the handler
      that was installed before is Python's default one.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    if received:
      if callable(previous):
        previous(signal.SIGINT, received[0])
      elif previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)


def run_tasks(config: RunConfig, data_dir: str | None = None) -> list[base.Task]:
  """The task variants of a run (:func:`metatrain.tasks.build_tasks` with its settings).

  Args:
    config: the run.
    data_dir: where datasets are, for tasks that read one (``None``: their default).
  """
  return build_tasks(config.task, family=config.task_family,
                     num_variants=config.num_task_variants, overrides=config.task_overrides,
                     seed=config.seed, data_dir=data_dir)


@chex.dataclass
class Counters:
  """Run totals carried in the state (so that they survive a resume).

  Attributes:
    skipped_nonfinite: meta-steps whose gradient was not finite (not applied).
    divergences: inner runs reset after diverging.
    resets: inner runs started (horizon reached or diverged).
  """
  skipped_nonfinite: jax.Array
  divergences: jax.Array
  resets: jax.Array


@chex.dataclass
class MetaTrainState:
  """Everything a meta-training run carries from one meta-step to the next (and checkpoints).

  Attributes:
    step: meta-steps done (int32 scalar).
    meta_params: the learned optimizer's weights.
    meta_opt_state: the meta-optimizer's (clipped Adam's) state.
    estimator_states: one :class:`~metatrain.estimators.EstimatorState` per task variant,
      each with a leading particle axis (sharded over devices).
    counters: run totals.
  """
  step: jax.Array
  meta_params: Any
  meta_opt_state: Any
  estimator_states: list[estimators.EstimatorState]
  counters: Counters


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class MetaTrainer:
  """Runs, checkpoints and resumes meta-training for one :class:`RunConfig`.

  Example:
    >>> trainer = MetaTrainer(get_config("quadratic"), "/tmp/run")
    >>> state = trainer.train()
  """

  def __init__(self, config: RunConfig, workdir: str | os.PathLike, *,
               data_dir: str | None = None, devices: list | None = None,
               progress: bool | None = None):
    self.config = config
    self.workdir = pathlib.Path(workdir).absolute()
    self.lopt = optax_learned.LearnedOptimizer(**config.optimizer)
    self.tasks = run_tasks(config, data_dir)
    self.estimators = [estimators.Estimator(task, self.lopt, config.estimator, config.truncation)
                       for task in self.tasks]
    self.data = [task.load_data() for task in self.tasks]
    self.meta_optimizer = optax.chain(optax.clip_by_global_norm(config.meta_grad_clip),
                                      optax.adam(config.meta_learning_rate))
    devices = jax.devices() if devices is None else devices
    num_particles = config.estimator.num_particles
    if num_particles % len(devices):
      raise ValueError(f"num_tasks * num_pairs = {num_particles} must be divisible by the "
                       f"number of devices ({len(devices)})")
    chunk = config.estimator.resolved_particle_chunk()
    if chunk % len(devices):
      raise ValueError(f"estimator.particle_chunk = {chunk} must be a multiple of the number "
                       f"of devices ({len(devices)}) so that each device runs its own "
                       f"particles")
    self.mesh = Mesh(np.asarray(devices), ("particles",))
    self.progress = sys.stderr.isatty() if progress is None else progress
    self._step_fns = [jax.jit(functools.partial(self._meta_step, slot), donate_argnums=0)
                      for slot in range(len(self.tasks))]

  # -- state ------------------------------------------------------------------------------

  def init_state(self) -> MetaTrainState:
    """The state at meta-step 0: weights, meta-optimizer and every estimator's inner runs."""
    init_key, *slot_keys = jax.random.split(jax.random.PRNGKey(self.config.seed),
                                            len(self.tasks) + 1)
    meta_params = self.lopt.init(init_key)
    if self.config.init_from:
      lopt, meta_params = optax_learned.load_weights(self.config.init_from)
      if lopt != self.lopt:
        raise ValueError(f"init_from={self.config.init_from!r} holds an optimizer with config "
                         f"{lopt.to_dict()}, not the run's {self.lopt.to_dict()}")
    return MetaTrainState(
        step=jnp.zeros([], jnp.int32),
        meta_params=meta_params,
        meta_opt_state=self.meta_optimizer.init(meta_params),
        estimator_states=[est.init(meta_params, key, data) for est, key, data in
                          zip(self.estimators, slot_keys, self.data, strict=True)],
        counters=Counters(skipped_nonfinite=jnp.zeros([], jnp.int32),
                          divergences=jnp.zeros([], jnp.float32),
                          resets=jnp.zeros([], jnp.float32)))

  def shardings(self, state: Any) -> Any:
    """Particle-axis sharding for estimator states; everything else replicated.

    Args:
      state: a :class:`MetaTrainState`, or a checkpoint's tree of the same top-level keys.
    """
    replicated = NamedSharding(self.mesh, PartitionSpec())
    particles = NamedSharding(self.mesh, PartitionSpec("particles"))
    placed = {key: jax.tree.map(lambda _, s=(particles if key == "estimator_states"
                                             else replicated): s, value)
              for key, value in state.items()}
    return type(state)(**placed) if isinstance(state, MetaTrainState) else placed

  def _meta_step(self, slot: int, state: MetaTrainState, data: base.Data):
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), state.step)
    num_segments = truncation_lib.scheduled_segments(
        self.config.truncation, state.step, jax.random.fold_in(key, _SCHEDULE_STREAM))
    gradient, est_state, diagnostics = self.estimators[slot].estimate(
        state.meta_params, state.estimator_states[slot], key, data, num_segments)
    finite = _all_finite(gradient)
    updates, opt_state = self.meta_optimizer.update(gradient, state.meta_opt_state,
                                                    state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    est_states = list(state.estimator_states)
    est_states[slot] = est_state
    counters = state.counters
    new_state = MetaTrainState(
        step=state.step + 1,
        meta_params=keep(meta_params, state.meta_params),
        meta_opt_state=keep(opt_state, state.meta_opt_state),
        estimator_states=est_states,
        counters=Counters(skipped_nonfinite=counters.skipped_nonfinite + (~finite),
                          divergences=counters.divergences + diagnostics["divergences"],
                          resets=counters.resets + diagnostics["resets"]))
    return new_state, {**diagnostics, "skipped": ~finite}

  # -- work directory ---------------------------------------------------------------------

  def _prepare_workdir(self) -> None:
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      probe = self.workdir / ".write_probe"
      probe.write_text("ok")
      probe.unlink()
    except OSError as e:
      raise WorkdirError(f"cannot write to the work directory {self.workdir}: {e}") from e
    config_file = self.workdir / CONFIG_FILE
    if config_file.exists():
      try:
        stored = RunConfig.from_dict(json.loads(config_file.read_text()))
      except (OSError, ValueError, TypeError) as e:
        raise WorkdirError(f"{config_file} is not a readable run config: {e}") from e
      differences = self.config.differences(stored)
      if differences:
        lines = "\n".join(f"  {k}: stored {old!r}, requested {new!r}"
                          for k, (new, old) in sorted(differences.items()))
        raise WorkdirError(
            f"{self.workdir} holds a run with a different config; refusing to resume it:\n"
            f"{lines}\nUse another --workdir, or the stored config.")
    if jax.process_index() == 0:  # one writer when many hosts share the work directory
      atomic_write(config_file, json.dumps(self.config.to_dict(), indent=2, sort_keys=True))

  def checkpoint_manager(self) -> ocp.CheckpointManager:
    """The run's Orbax checkpoint manager (only finished checkpoints are ever listed)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=self.config.max_to_keep, create=True)
    return ocp.CheckpointManager(self.workdir / CHECKPOINT_DIR, options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())

  def restore_or_init(self, manager: ocp.CheckpointManager) -> MetaTrainState:
    """The latest checkpointed state, or a fresh one; placed with :meth:`shardings`.

    A checkpoint is restored as the tree it was written as and then matched to this run's
    state leaf by leaf, by key path, so checkpoints of the earlier layout (estimator states
    with ``negative`` and ``accumulated`` beside ``positive``) resume too.

    Raises:
      WorkdirError: the checkpoint does not hold this run's state (naming the first leaf
        that is missing or differs).
    """
    latest = manager.latest_step()
    if latest is None:
      state = self.init_state()
      return jax.device_put(state, self.shardings(state))
    stored = manager.item_metadata(latest)
    stored = dict(getattr(stored, "tree", stored))
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                          stored, self.shardings(stored))
    raw = manager.restore(latest, args=ocp.args.StandardRestore(target))
    return _match_checkpoint(raw, jax.eval_shape(self.init_state),
                             f"checkpoint {latest} in {self.workdir}")

  # -- the loop ---------------------------------------------------------------------------

  def train(self, steps: int | None = None) -> MetaTrainState:
    """Meta-trains up to ``steps`` meta-steps in all (default ``config.steps``), resuming.

    Returns:
      The final state.

    Raises:
      WorkdirError: an unwritable work directory or one holding a different run.
    """
    total = self.config.steps if steps is None else steps
    self._prepare_workdir()
    with workdir_lock(self.workdir):
      return self._train_locked(total)

  def _train_locked(self, total: int) -> MetaTrainState:
    manager = self.checkpoint_manager()
    state = self.restore_or_init(manager)
    start = int(state.step)
    if start and jax.process_index() == 0:
      print(f"resuming from step {start}", file=sys.stderr, flush=True)
    primary = jax.process_index() == 0  # other hosts only compute and checkpoint
    metrics_path = self.workdir / METRICS_FILE
    elapsed = _truncate_metrics(metrics_path, start) if primary else 0.0
    bar = _progress(start, total, self.progress)
    began = time.perf_counter() - elapsed
    done = start
    try:
      with open(metrics_path if primary else os.devnull, "a") as metrics_file:
        for step in range(start, total):
          slot = step % len(self.tasks)
          state, diagnostics = self._step_fns[slot](state, self.data[slot])
          done = step + 1
          if done % self.config.log_every == 0 or done == total:
            record = _metrics_record(done, slot, diagnostics, state.counters,
                                     time.perf_counter() - began)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.report(record)
          if done % self.config.checkpoint_every == 0 or done == total:
            with _sigint_deferred():
              manager.save(done, args=ocp.args.StandardSave(state))
            if primary:
              plots.plot_metrics(metrics_path, self.workdir / "metrics.png")
      manager.wait_until_finished()
    except KeyboardInterrupt:
      manager.wait_until_finished()  # a save in flight completes; none is left half-written
      raise Interrupted(manager.latest_step() or 0, done) from None
    except OSError as e:
      raise WorkdirError(f"writing to {self.workdir} failed: {e}; the last complete "
                         "checkpoint is intact and a new run resumes from it") from e
    finally:
      bar.close()
    return state


def restore_on_this_host(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """A checkpointed state restored onto this host's first device, whatever the device count
  it was saved with (a run sharded over 4 devices exports on a 1-device laptop)."""
  stored = manager.item_metadata(step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          stored)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _truncate_metrics(path: pathlib.Path, step: int) -> float:
  """Drops metrics lines after ``step`` (written after the checkpoint being resumed).

  Returns:
    The wall time of the last kept line, to continue the clock.
  """
  if not path.exists():
    return 0.0
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut by a kill
    if record.get("step", 0) <= step:
      kept.append(record)
  atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
  return float(kept[-1]["wall_time"]) if kept else 0.0


def _metrics_record(step: int, slot: int, diagnostics, counters: Counters,
                    wall_time: float) -> dict:
  """One metrics line; non-finite numbers are ``null`` (as in every JSON file of metatrain)."""
  values = jax.device_get({**diagnostics, **{f"total_{k}": v for k, v in counters.items()}})
  record = {"step": step, "task_slot": slot, "wall_time": round(wall_time, 3)}
  record.update({key: np.asarray(value).item() for key, value in sorted(values.items())})
  return jsonable(record)


def _path_keys(path) -> list:
  """A key path as dict keys and list indices (NamedTuple and dataclass fields by name)."""
  keys = []
  for entry in path:
    if isinstance(entry, jax.tree_util.SequenceKey):
      keys.append(entry.idx)
    elif isinstance(entry, jax.tree_util.DictKey):
      keys.append(entry.key)
    else:
      keys.append(entry.name)
  return keys


def _earlier_layout(keys: list) -> list:
  """Where a leaf of the current layout lived in checkpoints of the earlier one: estimator
  states held PES's ``negative`` and ``accumulated`` beside ``positive``, not under ``es``."""
  if len(keys) > 3 and keys[0] == "estimator_states" and keys[2] == "es":
    return keys[:2] + keys[3:]
  return keys


def _match_checkpoint(raw: Any, expected: MetaTrainState, what: str) -> MetaTrainState:
  """Builds ``expected``'s structure from a restored tree of nested dicts and lists."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(expected)
  leaves = []
  for path, want in paths:
    keys = _path_keys(path)
    for candidate in (keys, _earlier_layout(keys)):
      node = raw
      try:
        for key in candidate:
          node = node[key]
      except (KeyError, IndexError, TypeError):
        continue
      break
    else:
      raise WorkdirError(f"{what} does not hold this run's state: it has no "
                         f"{'/'.join(map(str, keys))}. Use another --workdir.")
    if node.shape != want.shape or node.dtype != want.dtype:
      raise WorkdirError(f"{what} does not hold this run's state: "
                         f"{'/'.join(map(str, keys))} is {node.dtype}{list(node.shape)}, this "
                         f"run expects {want.dtype}{list(want.shape)}. Use another --workdir.")
    leaves.append(node)
  return jax.tree.unflatten(treedef, leaves)


def _fmt(value: float | None, spec: str) -> str:
  return "nan" if value is None else format(value, spec)


class _progress:
  """A tqdm bar on a terminal; plain log lines otherwise."""

  def __init__(self, start: int, total: int, interactive: bool):
    self.total = total
    self.bar = None
    if interactive:
      import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm.tqdm(total=total, initial=start, desc="meta-train", unit="step")
    self.last = start

  def report(self, record: dict) -> None:
    if self.bar is not None:
      self.bar.update(record["step"] - self.last)
      self.bar.set_postfix(meta_loss=_fmt(record["meta_loss"], ".4f"))
    else:
      print(f"step {record['step']}/{self.total} meta_loss {_fmt(record['meta_loss'], '.4f')} "
            f"grad_norm {_fmt(record['grad_norm'], '.3g')} skipped "
            f"{record['total_skipped_nonfinite']} divergences "
            f"{record['total_divergences']:.0f} wall {record['wall_time']:.1f}s", flush=True)
    self.last = record["step"]

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def export(workdir: str | os.PathLike, out: str | os.PathLike, *,
           overwrite: bool = False) -> pathlib.Path:
  """Writes the latest meta-parameters of a run as an ``optax_learned`` checkpoint.

  The training config and a summary (meta-steps, last metrics, wall time) go into the
  checkpoint's metadata; ``optax_learned.load(out)`` accepts the result.

  Raises:
    WorkdirError: no run config or no finished checkpoint in ``workdir``.
  """
  workdir = pathlib.Path(workdir).absolute()
  config_file = workdir / CONFIG_FILE
  if not config_file.is_file():
    raise WorkdirError(f"{workdir} is not a meta-training work directory: no {CONFIG_FILE}")
  config = RunConfig.from_dict(json.loads(config_file.read_text()))
  manager = ocp.CheckpointManager(workdir / CHECKPOINT_DIR,
                                  options=ocp.CheckpointManagerOptions(create=False),
                                  item_handlers=ocp.StandardCheckpointHandler())
  step = manager.latest_step()
  if step is None:
    raise WorkdirError(f"{workdir} has no finished checkpoint to export")
  lopt = optax_learned.LearnedOptimizer(**config.optimizer)
  meta_params = jax.tree.map(np.asarray, restore_on_this_host(manager, step)["meta_params"])
  records = []
  if (workdir / METRICS_FILE).exists():
    records = [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()
               if line.strip()]
    records = [r for r in records if r["step"] <= step]
  metadata = {"description": config.description, "training_config": config.to_dict(),
              "summary": {"meta_steps": step, "last_metrics": records[-1] if records else None,
                          "wall_time_seconds": records[-1]["wall_time"] if records else None}}
  return optax_learned.save(out, lopt, meta_params, metadata=metadata, overwrite=overwrite)
