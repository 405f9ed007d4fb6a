"""Picks among exported checkpoints of a meta-training run by a meta-validation score.

Meta-training curves of the ``cifar`` recipe are noisy, and later weights are not always
better (see ``checkpoints/cifar/MODEL_CARD.md``). This script trains the paper's 32x32
ConvNet with each candidate and with Adam at one learning rate, from *selection* seeds
(PRNG keys 20000+, disjoint from meta-training's and from the evaluation's 10000+), and
validates on the meta-validation rows (``validate_on="valid"``), never on the holdout rows
that the final evaluation uses. It prints one row per candidate: final training and
validation loss, and steps to reach Adam's final training loss. The candidate with the lowest
final validation loss is printed last.

With ``--json`` it also writes the scores with each export's meta-steps and the run's
wall-clock hours at that step (from ``--metrics``, the run's ``metrics.jsonl``, else from the
export's metadata), and with ``--plot`` the compute-quality curve: final meta-validation loss
against meta-training hours, beside Adam's.

Usage::

  export OPTAX_LEARNED_DATA=/path/to/cifar10
  python -m benchmarks.select_checkpoint runs/exp/step_300 runs/exp/step_400 --seeds 2
  python -m benchmarks.select_checkpoint exports/s* --metrics runs/exp/metrics.jsonl \
      --json curve.json --plot curve.png
"""

import argparse
import functools
import json
import logging
import math
import pathlib
import sys

import numpy as np

import optax_learned
from metatrain import evaluation, tasks
from metatrain._json_io import jsonable

SELECTION_SEED_OFFSET = 20_000


def score(run: evaluation.Run, target: float) -> dict:
  """Final losses of a run and the step at which its mean training loss reaches ``target``."""
  mean = run["mean"]
  step, _ = evaluation.time_to_target(run["steps"], mean["seconds"], mean["train_loss"], target)
  return {"train": mean["train_loss"][-1], "valid": mean["valid_loss"][-1], "steps": step}


def meta_training_hours(path: str, metrics: pathlib.Path | None) -> tuple[int | None,
                                                                         float | None]:
  """An export's meta-steps and the run's wall-clock hours when it was written."""
  summary = optax_learned.load_metadata(path).get("summary") or {}
  steps, seconds = summary.get("meta_steps"), summary.get("wall_time_seconds")
  if metrics is not None and steps is not None:
    seconds = _wall_times(metrics).get(steps, seconds)
  return steps, None if seconds is None else seconds / 3600


@functools.cache
def _wall_times(metrics: pathlib.Path) -> dict[int, float]:
  """Wall-clock seconds by meta-step of a run's ``metrics.jsonl`` (read once per file)."""
  records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
  return {r["step"]: r["wall_time"] for r in records if "step" in r}


def plot_curve(runs: dict[str, dict], path: pathlib.Path) -> None:
  """Final meta-validation loss against meta-training hours, one curve per run (label to the
  results of ``--json``), with the first run's Adam as a line."""
  import matplotlib  # noqa: PLC0415 (only with --plot)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for label, results in runs.items():
    points = sorted((c["hours"], c["valid"], c["meta_steps"]) for c in results["checkpoints"]
                    if c["hours"] is not None)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    for hours, valid, steps in points:
      ax.annotate(str(steps), (hours, valid), textcoords="offset points", xytext=(3, 4),
                  fontsize="x-small")
  results = next(iter(runs.values()))
  ax.axhline(results["adam"]["valid"], color="gray", ls="--",
             label=f"Adam {results['adam']['learning_rate']:g}")
  ax.set_xlabel("meta-training wall-clock hours")
  ax.set_ylabel(f"final meta-validation loss ({results['steps']} steps)")
  ax.set_title(f"{results['task']}: quality against meta-training compute")
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("checkpoints", nargs="*", help="exported checkpoint directories")
  parser.add_argument("--task", default="cifar_conv_32")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--adam_learning_rate", type=float, default=3.16e-3,
                      help="Adam's learning rate (the tuned one of the evaluation protocol)")
  parser.add_argument("--holdout_size", type=int, default=5000,
                      help="rows kept out of training, as in the recipe (not validated on)")
  parser.add_argument("--metrics", type=pathlib.Path, default=None,
                      help="the run's metrics.jsonl (wall-clock time at each export's step)")
  parser.add_argument("--json", type=pathlib.Path, default=None, help="write the scores here")
  parser.add_argument("--plot", type=pathlib.Path, default=None,
                      help="write the compute-quality curve here (PNG)")
  parser.add_argument("--plot-from", nargs="+", default=None, metavar="LABEL=JSON",
                      help="only plot: the curves of earlier --json outputs (no training)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  if args.plot_from:
    if not args.plot:
      parser.error("--plot-from needs --plot PATH")
    runs = {}
    for item in args.plot_from:
      label, sep, path = item.partition("=")
      if not sep:
        parser.error(f"--plot-from expects LABEL=JSON, got {item!r}")
      runs[label] = json.loads(pathlib.Path(path).read_text())
    plot_curve(runs, args.plot)
    return 0
  if not args.checkpoints:
    parser.error("give exported checkpoint directories (or --plot-from)")

  task = tasks.get_task(args.task, conv_impl="lax", holdout_size=args.holdout_size,
                        validate_on="valid")
  data = task.load_data()
  kwargs = dict(steps=args.steps, seeds=args.seeds, data=data,
                seed_offset=SELECTION_SEED_OFFSET)
  adam = evaluation.train_baseline("adam", args.adam_learning_rate, task, **kwargs)
  target = adam["mean"]["train_loss"][-1]
  print(f"adam {args.adam_learning_rate:g}: train {target:.4f} "
        f"valid {adam['mean']['valid_loss'][-1]:.4f}", flush=True)
  scores = {}
  for path in args.checkpoints:
    run = evaluation.evaluate_transformation(optax_learned.load(path), task, **kwargs)
    scores[path] = score(run, target)
    s = scores[path]
    steps = "-" if s["steps"] is None else f"{s['steps']:.0f}"
    print(f"{path}: train {s['train']:.4f} valid {s['valid']:.4f} "
          f"steps to Adam's train loss {steps}", flush=True)
  best = min(scores, key=lambda p: scores[p]["valid"] if math.isfinite(scores[p]["valid"])
             else np.inf)
  print(f"best by meta-validation loss: {best}")
  results = {"task": args.task, "steps": args.steps, "seeds": args.seeds,
             "adam": {"learning_rate": args.adam_learning_rate, "train": target,
                      "valid": adam["mean"]["valid_loss"][-1]},
             "checkpoints": []}
  for path, s in scores.items():
    meta_steps, hours = meta_training_hours(path, args.metrics)
    results["checkpoints"].append({"path": path, "meta_steps": meta_steps, "hours": hours,
                                   **s})
  if args.json:
    args.json.write_text(json.dumps(jsonable(results), indent=2) + "\n")
  if args.plot:
    plot_curve({"learned optimizer": results}, args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
