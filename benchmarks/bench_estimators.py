"""Inner-step throughput of meta-gradient estimation relative to plain Adam training.

For each task and estimator (pathwise, ES, PES, NRES, merged) this measures, in one run, inner
training steps per second while estimating meta-gradients with
:class:`metatrain.estimators.Estimator` (8 task instances x 8 antithetic pairs, the learned
optimizer and estimator settings of the recipe that meta-trains on the task: ``digits`` for
``digits_mlp``, ``cifar`` otherwise; ``--config`` and ``--set`` change them; one truncation
per estimate),
divided by inner steps per second of plain Adam training of the same task and batch (a
jitted Adam step called from a Python loop on one task instance). An estimate counts
``particles x truncation_length`` inner steps, with 2 x 64 particles for ES, PES, NRES and merged
(both halves of every antithetic pair train) and 64 for pathwise. The Adam loop is
:class:`metatrain.measurement.TrainingLoop`, and times are medians of
``--repeats`` calls after compilation (compile time reported separately); the estimator
state is threaded through the calls as in meta-training.

``--devices N`` re-executes the script with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
and reports each estimator on 1, 2, 4, ... and N host devices, the particle axis of its state
sharded over a 1-D mesh as :meth:`metatrain.trainer.MetaTrainer.shardings` does. ``--profile``
adds a per-step cost breakdown (vectorised Adam, learned optimizer, validation pass, unroll,
second order) and compiled memory.

Usage::

  OPTAX_LEARNED_DATA=/path/to/cifar10 python -m benchmarks.bench_estimators
  python -m benchmarks.bench_estimators --tasks digits_mlp --repeats 5 --profile
  python -m benchmarks.bench_estimators --devices 2
  python -m benchmarks.bench_estimators --set truncation.meta_loss_every=20 \
      --set estimator.particle_chunk=1

Targets (ratio of inner steps per second to Adam's): ES and PES >= 0.8, pathwise >= 0.2,
merged >= 0.2.
"""

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optax_learned
from metatrain import configs, estimators, measurement, truncation
from metatrain import data as data_lib
from metatrain.tasks import base, families

TARGETS = {"es": 0.8, "pes": 0.8, "pathwise": 0.2, "merged": 0.2}
# The recipe that meta-trains on each task (others: "cifar").
RECIPES = {"digits_mlp": "digits"}
DEVICE_FLAG = "--xla_force_host_platform_device_count"
NUM_TASKS = NUM_PAIRS = 8


# -- timing ------------------------------------------------------------------------------


def _compile(fn: Callable, *args, **jit_kwargs) -> tuple[Callable, float, float]:
  """Jits and compiles ``fn`` for ``args``; returns it, compile seconds and temp bytes."""
  start = time.perf_counter()
  compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return compiled, seconds, getattr(memory, "temp_size_in_bytes", float("nan"))


def available_bytes() -> float:
  """Memory the kernel reports as available (``MemAvailable``), or infinity if unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return 1024.0 * int(line.split()[1])
  except OSError:
    pass
  return float("inf")


# -- the Adam baseline -------------------------------------------------------------------


def calibrated_loop(task: base.Task, data: base.Data, tx: optax.GradientTransformation,
                    seconds: float = 0.5) -> tuple[measurement.TrainingLoop, float]:
  """The training loop of one task instance, ``num_steps`` chosen so a call takes ``seconds``.

  The step samples a training batch inside ``jit`` as inner training does and applies
  ``tx`` (``optax.adam`` for the baseline); the dataset is an argument, as in meta-training.

  Args:
    task: the task instance.
    data: its device data.
    tx: the transformation.
    seconds: the wall-clock a call should take, about.

  Returns:
    The loop and the seconds of its warm-up (compilation).
  """
  loop = measurement.TrainingLoop.create(task, tx, data, jax.random.key(0), num_steps=10)
  start = time.perf_counter()
  loop.warm_up()
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(loop())
  loop.num_steps = max(10, int(seconds * 10 / (time.perf_counter() - start)))
  return loop, compile_seconds


# -- the estimators ----------------------------------------------------------------------


def estimator_settings(name: str, truncation_length: int,
                       run_config: configs.RunConfig | None = None
                       ) -> tuple[estimators.EstimatorConfig, truncation.TruncationConfig]:
  """``run_config``'s estimator and truncation sections (default: the ``cifar`` recipe's),
  with estimator ``name``, 8 x 8 particles and truncations of ``truncation_length``."""
  run_config = run_config or configs.get_config("cifar")
  return (dataclasses.replace(run_config.estimator, name=name, num_tasks=NUM_TASKS,
                              num_pairs=NUM_PAIRS),
          dataclasses.replace(run_config.truncation, length=truncation_length))


def inner_steps_per_estimate(config: estimators.EstimatorConfig,
                             tcfg: truncation.TruncationConfig) -> int:
  """Particles that train (both halves of a pair for estimators with an ES side) x steps."""
  halves = 1 if config.es_side is None else 2
  return halves * config.num_particles * tcfg.length


class EstimatorRun:
  """Threads an estimator's state through repeated jitted estimates, sharded over devices.

  The particle axis of the state is sharded over a 1-D mesh of ``devices`` and everything
  else replicated, as :meth:`metatrain.trainer.MetaTrainer.shardings` does.
  """

  def __init__(self, task: base.Task, data: base.Data, lopt: optax_learned.LearnedOptimizer,
               settings: tuple[estimators.EstimatorConfig, truncation.TruncationConfig],
               devices: list):
    est = estimators.Estimator(task, lopt, *settings)
    mesh = Mesh(np.asarray(devices), ("particles",))
    replicated = NamedSharding(mesh, PartitionSpec())
    particles = NamedSharding(mesh, PartitionSpec("particles"))
    self.meta_params = jax.device_put(lopt.init(jax.random.PRNGKey(0)), replicated)
    self.data = jax.device_put(data, replicated)
    state = est.init(self.meta_params, jax.random.PRNGKey(1), self.data)
    self.state = jax.device_put(state, jax.tree.map(lambda _: particles, state))
    self.key = jax.device_put(jax.random.PRNGKey(2), replicated)
    # temp_bytes: compiled temporaries per device.
    self.estimate, self.compile_seconds, self.temp_bytes = _compile(
        est.estimate, self.meta_params, self.state, self.key, self.data, donate_argnums=1)
    self.inner_steps = inner_steps_per_estimate(*settings)

  def __call__(self) -> Any:
    self.key = jax.random.split(self.key)[0]
    gradient, self.state, _ = self.estimate(self.meta_params, self.state, self.key, self.data)
    return gradient


# -- profile -----------------------------------------------------------------------------


def profile(task: base.Task, data: base.Data, lopt: optax_learned.LearnedOptimizer,
            truncation_length: int, repeats: int, particles: int = 32, chunk: int = 1
            ) -> dict[str, tuple[float, float]]:
  """Cost per inner step of the pieces of an estimate, on vmapped particles.

  Forward pieces run ``particles`` particles, gradients half as many (as an estimate with
  ``particles / 2`` pairs does), to bound the memory of the second-order pieces.

  * ``loop_adam`` / ``loop_lopt``: one task instance, jitted step in a Python loop, with
    Adam (the baseline) or the learned optimizer;
  * ``update_adam`` / ``update_lopt``: the optimizer update alone (gradients replaced by
    the parameters), in ``lax.scan``, vmapped;
  * ``scan_adam``: Adam steps in ``lax.scan``, vmapped (vectorisation);
  * ``scan_lopt``: the same with the learned optimizer;
  * ``scan_lopt_valid``: plus the validation-loss forward pass after every step;
  * ``unroll``: :func:`metatrain.truncation.unroll` (adds the per-step reset logic and the
    meta-loss transform): one half of an ES or PES estimate;
  * ``unroll_grad``: per-particle gradient of the mean meta-loss through ``unroll``: the
    pathwise estimate;
  * ``unroll_grad_remat``: the same through single-step unrolls each under
    ``jax.checkpoint`` (stores the inner state per step instead of every intermediate);
  * ``unroll_map`` / ``unroll_grad_map``: ``unroll`` / ``unroll_grad`` with the particles
    in ``lax.map`` chunks of ``chunk`` (vmapped within a chunk) instead of one ``vmap``.

  Returns:
    Per piece, ``(microseconds per inner step, compiled temporary memory in MiB)``.
  """
  _, tcfg = estimator_settings("es", truncation_length)
  num = particles
  meta_params = lopt.init(jax.random.PRNGKey(0))
  keys = jax.random.split(jax.random.PRNGKey(1), num)
  states = jax.vmap(lambda k: truncation.init_inner_state(task, lopt, meta_params, tcfg, k))(
      keys)
  thetas = jax.tree.map(lambda m: jnp.broadcast_to(m, (num,) + m.shape), meta_params)

  def scan(tx_fn, valid):
    def one(theta, state, data):
      tx = tx_fn(theta)

      def step(carry, _):
        params, opt_state, count = carry
        key = jax.random.fold_in(state.run_key, count)
        loss, grads = jax.value_and_grad(task.loss)(
            params, task.sample_batch(data, key, "train"))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if valid:
          loss = task.loss(params, task.sample_batch(data, key, "valid"))
        return (params, opt_state, count + 1), loss

      carry = (state.params, tx.init(state.params), jnp.zeros([], jnp.int32))
      return jnp.mean(jax.lax.scan(step, carry, length=truncation_length)[1])
    return jax.vmap(one, in_axes=(0, 0, None))

  def update(tx_fn):
    def one(theta, state, data):
      del data
      tx = tx_fn(theta)

      def step(carry, _):
        params, opt_state = carry
        updates, opt_state = tx.update(params, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

      carry = (state.params, tx.init(state.params))
      params = jax.lax.scan(step, carry, length=truncation_length)[0][0]
      return sum(jnp.sum(p) for p in jax.tree.leaves(params))
    return jax.vmap(one, in_axes=(0, 0, None))

  def unroll(theta, state, data):
    return jnp.mean(truncation.unroll(task, lopt, tcfg, theta, state, data)[1].meta_losses)

  def unroll_remat(theta, state, data):
    one_step = dataclasses.replace(tcfg, length=1)
    step = jax.checkpoint(lambda t, s: truncation.unroll(task, lopt, one_step, t, s, data))
    _, out = jax.lax.scan(lambda s, _: step(theta, s), state, length=truncation_length)
    return jnp.mean(out.meta_losses)

  pieces = {
      "update_adam": (update(lambda _: optax.adam(1e-3)), num),
      "update_lopt": (update(lopt.transform), num),
      "scan_adam": (scan(lambda _: optax.adam(1e-3), False), num),
      "scan_lopt": (scan(lopt.transform, False), num),
      "scan_lopt_valid": (scan(lopt.transform, True), num),
      "unroll": (jax.vmap(unroll, in_axes=(0, 0, None)), num),
      "unroll_grad": (jax.vmap(jax.grad(unroll), in_axes=(0, 0, None)), num // 2),
      "unroll_grad_remat": (jax.vmap(jax.grad(unroll_remat), in_axes=(0, 0, None)),
                            num // 2),
      "unroll_map": (_chunked(unroll, chunk), num),
      "unroll_grad_map": (_chunked(jax.grad(unroll), chunk), num // 2),
  }
  thunks, steps, memory = {}, {}, {}
  for name, (fn, count) in pieces.items():
    args = (*jax.tree.map(lambda x, count=count: x[:count], (thetas, states)), data)
    compiled, _, temp_bytes = _compile(fn, *args)
    thunks[name] = lambda compiled=compiled, args=args: compiled(*args)
    steps[name], memory[name] = count * truncation_length, temp_bytes / 2**20
  for name, tx in (("loop_adam", optax.adam(1e-3)),
                   ("loop_lopt", lopt.transform(meta_params))):
    thunks[name], _ = calibrated_loop(task, data, tx)
    steps[name], memory[name] = thunks[name].num_steps, float("nan")
  seconds = measurement.interleaved_medians(thunks, repeats)
  return {name: (1e6 * seconds[name] / steps[name], memory[name]) for name in thunks}


def _chunked(fn: Callable, chunk: int) -> Callable:
  """``fn(theta, state, data)`` over particles: ``lax.map`` over chunks, ``vmap`` within."""
  return lambda theta, state, data: jax.lax.map(
      lambda a: fn(*a, data), (theta, state), batch_size=chunk)


# -- main --------------------------------------------------------------------------------


def _device_counts(requested: int) -> list[int]:
  counts = sorted({d for d in (1, 2, 4, 8, 16, 32, 64) if d < requested} | {requested})
  return [d for d in counts if (NUM_TASKS * NUM_PAIRS) % d == 0]


def _reexec_with_devices(count: int) -> None:
  """Restarts this benchmark (``python -m benchmarks.bench_estimators``) with ``count`` host
  devices unless XLA_FLAGS already asks for them."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if f"{DEVICE_FLAG}={count}" in flags:
    return
  kept = [f for f in flags if not f.startswith(DEVICE_FLAG)]
  env = {**os.environ, "XLA_FLAGS": " ".join(kept + [f"{DEVICE_FLAG}={count}"])}
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_estimators",
                             *sys.argv[1:]], env)


def bench_task(task: base.Task, lopt: optax_learned.LearnedOptimizer, names: list[str],
               truncation_length: int, device_counts: list[int], repeats: int,
               run_config: configs.RunConfig) -> bool:
  """Prints one task's table of estimators against the Adam loop.

  Each estimator is timed interleaved with the Adam loop, so both see the same load
  (``ratio``), and compared with the Adam loop timed alone first (``alone``): a large
  estimate can slow the Adam calls after it (caches, allocator), which flatters ``ratio``.
  The verdict uses the smaller of the two.

  Returns:
    Whether an estimator missed its target on the most devices, or could not run there
    for lack of memory.
  """
  data = task.load_data()
  adam, adam_compile_seconds = calibrated_loop(task, data, optax.adam(1e-3))
  adam_alone = adam.num_steps / measurement.interleaved_medians({"adam": adam}, repeats)["adam"]
  print(f"\n{task.name}: Adam alone {adam_alone:,.0f} steps/s ({1e6 / adam_alone:.0f} us/step, "
        f"compile {adam_compile_seconds:.1f}s)", flush=True)
  print(f"  {'estimator':<10}{'devices':>8}{'s/estimate':>11}{'steps/s':>10}"
        f"{'Adam st/s':>10}{'ratio':>7}{'alone':>7}{'target':>7}{'compile s':>10}"
        f"{'temp MB':>9}  verdict")
  missed = False
  for name in names:
    settings = estimator_settings(name, truncation_length, run_config)
    for count in device_counts:
      run = EstimatorRun(task, data, lopt, settings, jax.devices()[:count])
      if count * run.temp_bytes > 0.8 * available_bytes():  # host devices share the RAM
        needed = count * run.temp_bytes / 2**30
        print(f"  {name:<10}{count:>8}  skipped: needs {needed:.1f} GiB of temporaries, "
              f"{available_bytes() / 2**30:.1f} GiB available (compile "
              f"{run.compile_seconds:.1f}s)", flush=True)
        missed |= count == device_counts[-1]
        continue
      seconds = measurement.interleaved_medians({"estimate": run, "adam": adam}, repeats)
      steps_per_second = run.inner_steps / seconds["estimate"]
      adam_steps_per_second = adam.num_steps / seconds["adam"]
      ratio = steps_per_second / adam_steps_per_second
      ok = min(ratio, steps_per_second / adam_alone) >= TARGETS[name]
      missed |= not ok and count == device_counts[-1]
      print(f"  {name:<10}{count:>8}{seconds['estimate']:>11.3f}{steps_per_second:>10,.0f}"
            f"{adam_steps_per_second:>10,.0f}{ratio:>7.2f}"
            f"{steps_per_second / adam_alone:>7.2f}{TARGETS[name]:>7.2f}"
            f"{run.compile_seconds:>10.1f}{count * run.temp_bytes / 2**20:>9.0f}  "
            f"{'ok' if ok else 'MISSED'}", flush=True)
      del run
  return missed


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tasks", nargs="*", default=["digits_mlp", "cifar_conv_16"])
  parser.add_argument("--estimators", nargs="*", default=list(estimators.ESTIMATORS),
                      choices=estimators.ESTIMATORS)
  parser.add_argument("--truncation_length", type=int, default=20)
  parser.add_argument("--config", default=None, choices=sorted(configs.CONFIGS),
                      help="the recipe whose optimizer and estimator settings are timed "
                           "(default: the one that meta-trains on the task, see RECIPES)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the recipe, as `metatrain train --set` does "
                           "(e.g. truncation.meta_loss_every=20, estimator.particle_chunk=1, "
                           "truncation.remat=true); repeatable")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed estimates per estimator (median), interleaved with Adam")
  parser.add_argument("--devices", type=int, default=1,
                      help="host-platform devices to shard the particle axis over; reports "
                           "1, 2, 4, ... and N devices")
  parser.add_argument("--profile", action="store_true", help="per-step cost breakdown")
  parser.add_argument("--profile_particles", type=int, default=32,
                      help="particles of the forward profile pieces (gradients: half)")
  parser.add_argument("--profile_chunk", type=int, default=1,
                      help="particles per lax.map chunk in the *_map profile pieces")
  parser.add_argument("--data_dir", default=None,
                      help="CIFAR-10 directory (default: $OPTAX_LEARNED_DATA)")
  args = parser.parse_args(argv)
  if args.devices > 1 and argv is None:
    _reexec_with_devices(args.devices)
  if len(jax.devices()) < args.devices:
    parser.error(f"{args.devices} devices requested, {len(jax.devices())} available; set "
                 f"XLA_FLAGS={DEVICE_FLAG}={args.devices} before jax starts")
  if any(t.startswith("cifar") for t in args.tasks) and not (
      args.data_dir or os.environ.get(data_lib.ENV_VAR)):
    parser.error(f"the CIFAR tasks need --data_dir or {data_lib.ENV_VAR} (a directory with "
                 f"{data_lib.TRAIN_FILE})")

  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, {len(jax.devices())} device(s), load "
        f"{os.getloadavg()[0]:.1f}; {NUM_TASKS} tasks x {NUM_PAIRS} pairs, truncation "
        f"{args.truncation_length}; medians of {args.repeats}", flush=True)
  missed = False
  for task_name in args.tasks:
    recipe = args.config or RECIPES.get(task_name, "cifar")
    run_config = configs.get_config(recipe).with_overrides(
        [f"truncation.length={args.truncation_length}", f"estimator.num_tasks={NUM_TASKS}",
         f"estimator.num_pairs={NUM_PAIRS}", *args.set])
    lopt = optax_learned.LearnedOptimizer(**run_config.optimizer)
    print(f"\n{task_name}: the {recipe!r} recipe's optimizer {lopt.hidden_sizes} and estimator "
          f"settings (sigma {run_config.estimator.sigma}, meta-loss on "
          f"{run_config.truncation.meta_loss_split} every "
          f"{run_config.truncation.meta_loss_every} step(s), particle_chunk "
          f"{run_config.estimator.resolved_particle_chunk()}, "
          f"remat {run_config.truncation.remat})", flush=True)
    overrides = {"data_dir": args.data_dir} if task_name.startswith("cifar") else {}
    task = families.get_task(task_name, **overrides)
    missed |= bench_task(task, lopt, args.estimators, args.truncation_length,
                         _device_counts(args.devices), args.repeats, run_config)
    if args.profile:
      print(f"  profile: per inner step of one particle, {args.profile_particles} particles "
            f"(gradients {args.profile_particles // 2}), {args.truncation_length} steps:")
      pieces = profile(task, task.load_data(), lopt, args.truncation_length, args.repeats,
                       args.profile_particles, args.profile_chunk)
      for piece, (micros, megabytes) in pieces.items():
        memory = "" if np.isnan(megabytes) else f"{megabytes:>9.0f} MB"
        print(f"    {piece:<18}{micros:>10.1f} us{memory}", flush=True)
  return int(missed)


if __name__ == "__main__":
  sys.exit(main())
