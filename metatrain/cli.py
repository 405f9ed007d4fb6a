"""The ``metatrain`` command line: train, export, evaluate, diagnose and list.

Run ``metatrain COMMAND --help`` for every option of a command.
"""

import argparse
import json
import sys

from metatrain import configs

_DATA_HELP = ("directory holding cifar10_train.npz (and optionally cifar10_test.npz) for CIFAR "
              "tasks; default: $OPTAX_LEARNED_DATA, else TFDS")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, choices=sorted(configs.CONFIGS),
                      help="named recipe to start from (see `metatrain list`)")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE",
                      help="override a config key, e.g. --set estimator.name=merged "
                           "--set estimator.sigma=0.003 "
                           "--set optimizer.hidden_sizes=[16]; values parse as JSON when they "
                           "can (repeatable)")
  parser.add_argument("--data-dir", default=None, help=_DATA_HELP)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of every subcommand (also used to generate the CLI reference)."""
  parser = argparse.ArgumentParser(
      prog="metatrain", description="Meta-train learned optimizers (Metz et al. 2019) and "
      "evaluate them against tuned baselines.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  train = commands.add_parser(
      "train", help="run or resume meta-training",
      description="Meta-train a learned optimizer. DIR gets config.json, metrics.jsonl, "
      "metrics.png and Orbax checkpoints; calling again with the same DIR resumes from the "
      "last finished checkpoint (a different config is refused).")
  _add_config_options(train)
  train.add_argument("--workdir", required=True, help="directory of the run (created if absent)")
  train.add_argument("--steps", type=int, default=None,
                     help="meta-steps to reach in all (default: the config's `steps`)")
  train.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() first (multi-process runs). "
                          "Without --coordinator, JAX detects the cluster (SLURM, ...)")
  train.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="address of process 0 (jax.distributed.initialize's "
                          "coordinator_address); implies --distributed")
  train.add_argument("--num-processes", type=int, default=None, metavar="N",
                     help="processes in all (with --coordinator)")
  train.add_argument("--process-id", type=int, default=None, metavar="I",
                     help="this process's index, 0..N-1 (with --coordinator)")
  train.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto",
                     help="a progress bar (terminal) or plain log lines (default: auto)")

  export = commands.add_parser(
      "export", help="write a run's weights as an optax_learned checkpoint",
      description="Export the latest checkpoint of a run for optax_learned.load(PATH).")
  export.add_argument("--workdir", required=True, help="the run's directory")
  export.add_argument("--out", required=True, help="checkpoint directory to write")
  export.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")

  evaluate = commands.add_parser(
      "evaluate", help="train a task with an optimizer and tuned baselines",
      description="Train TASK with a learned optimizer beside learning-rate-tuned Adam, "
      "SGD with momentum and RMSProp; writes results.json, results.md and plots to OUT.")
  evaluate.add_argument("--optimizer", default=None,
                        help="bundled name or checkpoint path (omit for baselines only)")
  evaluate.add_argument("--task", required=True, help="task name (see `metatrain list`)")
  evaluate.add_argument("--steps", type=int, default=1000, help="training steps per run")
  evaluate.add_argument("--seeds", type=int, default=3, help="seeds per optimizer setting")
  evaluate.add_argument("--out", required=True, help="output directory")
  evaluate.add_argument("--baselines", default="adam,sgd_momentum,rmsprop",
                        help="comma-separated baselines to tune (empty for none)")
  evaluate.add_argument("--eval-every", type=int, default=None,
                        help="steps between validation measurements")
  evaluate.add_argument("--cache-dir", default=None,
                        help="where baseline results are cached (default ~/.cache/optax_learned)")
  evaluate.add_argument("--data-dir", default=None, help=_DATA_HELP)
  evaluate.add_argument("--task-set", dest="task_overrides", action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="replace a task field, e.g. --task-set holdout_size=5000 "
                             "--task-set validate_on=holdout (validate on rows meta-training "
                             "never saw); values parse as JSON when they can")

  diagnose = commands.add_parser(
      "diagnose", help="measure the pathologies of truncated unrolls",
      description="Meta-loss along a 1-D slice of the optimizer weights for several unroll "
      "lengths, the pathwise gradient norm and each estimator's variance against unroll "
      "length; writes diagnostics.json and PNG plots to OUT.")
  _add_config_options(diagnose)
  diagnose.add_argument("--out", required=True, help="output directory")
  diagnose.add_argument("--optimizer", default=None,
                        help="analyse these weights (bundled name or checkpoint path) instead "
                             "of a fresh initialisation")
  diagnose.add_argument("--lengths", type=_positive_ints, default=None, metavar="L1,L2,...",
                        help="unroll lengths in inner steps (default: 1, 2, 4 and 8 times the "
                             "config's truncation length)")
  diagnose.add_argument("--num-samples", type=int, default=64,
                        help="at least this many gradient samples per length")
  diagnose.add_argument("--slice-points", type=int, default=41,
                        help="points of the 1-D meta-loss slice (each costs one unroll per "
                             "task instance)")
  diagnose.add_argument("--task", default=None,
                        help="diagnose this task (see `metatrain list`) instead of the "
                             "config's first one")
  diagnose.add_argument("--task-set", dest="task_overrides", action="append", default=[],
                        metavar="FIELD=VALUE", help="replace a field of --task's task")

  commands.add_parser("list", help="list configs and tasks",
                      description="Print the named configs and tasks, one line each.")
  return parser


def _positive_ints(text: str) -> tuple[int, ...]:
  """An argparse ``type``: comma-separated positive integers."""
  try:
    values = tuple(int(value) for value in text.split(",") if value.strip())
  except ValueError:
    values = ()
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
  return values


def _task_overrides(assignments: list[str]) -> dict:
  """``FIELD=VALUE`` strings as a dict; values parse as JSON when they can, else strings."""
  overrides = {}
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
      raise ValueError(f"--task-set expects FIELD=VALUE, got {assignment!r}")
    try:
      overrides[key] = json.loads(text)
    except json.JSONDecodeError:
      overrides[key] = text
  return overrides


def _run_config(args) -> configs.RunConfig:
  return configs.get_config(args.config).with_overrides(args.overrides)


def main(argv: list[str] | None = None) -> int:
  """Entry point of the ``metatrain`` console script."""
  args = build_parser().parse_args(argv)
  try:
    return _dispatch(args)
  except KeyboardInterrupt:
    print(f"metatrain {args.command}: interrupted", file=sys.stderr)
    return 130
  except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
    print(f"metatrain {args.command}: error: {e}", file=sys.stderr)
    return 2


def _dispatch(args) -> int:
  if args.command == "list":
    from metatrain.tasks import task_names  # pylint: disable=import-outside-toplevel
    print("configs:")
    for name, (_, description) in sorted(configs.CONFIGS.items()):
      print(f"  {name:20s} {description}")
    print("tasks:")
    for name, description in task_names().items():
      print(f"  {name:20s} {description}")
    return 0
  if args.command == "train":
    config = _run_config(args)
    import jax  # pylint: disable=import-outside-toplevel
    cluster = (args.coordinator, args.num_processes, args.process_id)
    if args.coordinator is None and any(v is not None for v in cluster):
      raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
    if args.coordinator is not None and None in cluster:
      raise ValueError("--coordinator needs --num-processes N and --process-id I")
    if args.coordinator is not None:
      jax.distributed.initialize(coordinator_address=args.coordinator,
                                 num_processes=args.num_processes, process_id=args.process_id)
    elif args.distributed:
      jax.distributed.initialize()
    from metatrain import trainer  # pylint: disable=import-outside-toplevel
    progress = {"auto": None, "bar": True, "lines": False}[args.progress]
    runner = trainer.MetaTrainer(config, args.workdir, data_dir=args.data_dir, progress=progress)
    try:
      state = runner.train(args.steps)
    except trainer.Interrupted as interrupt:
      print(f"metatrain train: {interrupt}", file=sys.stderr)
      return 130
    print(f"meta-trained to step {int(state.step)}; checkpoints in {args.workdir}")
    return 0
  if args.command == "export":
    from metatrain import trainer  # pylint: disable=import-outside-toplevel
    path = trainer.export(args.workdir, args.out, overwrite=args.overwrite)
    print(f"exported to {path}")
    return 0
  if args.command == "evaluate":
    from metatrain import evaluation  # pylint: disable=import-outside-toplevel
    baselines = tuple(b for b in args.baselines.split(",") if b)
    kwargs = {"eval_every": args.eval_every} if args.eval_every else {}
    results = evaluation.evaluate(args.optimizer, args.task, steps=args.steps, seeds=args.seeds,
                                  out_dir=args.out, baselines=baselines, data_dir=args.data_dir,
                                  cache_dir=args.cache_dir,
                                  task_overrides=_task_overrides(args.task_overrides), **kwargs)
    print(json.dumps(results.get("summary", {}), indent=2, default=str))
    return 0
  if args.command == "diagnose":
    from metatrain import diagnostics  # pylint: disable=import-outside-toplevel
    meta_params = None
    if args.optimizer:
      import optax_learned  # pylint: disable=import-outside-toplevel
      _, meta_params = optax_learned.load_weights(args.optimizer)
    config = _run_config(args)
    task = None
    if args.task:
      from metatrain import tasks  # pylint: disable=import-outside-toplevel
      task = tasks.build_tasks(args.task, overrides=_task_overrides(args.task_overrides),
                               data_dir=args.data_dir)[0]
    elif args.task_overrides:
      raise ValueError("--task-set needs --task")
    diagnostics.diagnose(config, args.out, data_dir=args.data_dir, meta_params=meta_params,
                         lengths=args.lengths, num_samples=args.num_samples,
                         slice_points=args.slice_points, task=task)
    print(f"diagnostics written to {args.out}")
    return 0
  raise AssertionError(args.command)
