"""Runs the generality suite and summarises it: the learned optimizer against tuned Adam.

For each model: Adam's learning-rate grid on the first seed, the winners (by final training
loss and by final validation loss, at each horizon) on every seed, the learned optimizer on
every seed, and an interleaved step timing. Per model and horizon it reports

- steps and wall-clock (steps times the step-cost ratio) for the learned optimizer's
  training loss (the mean over seeds of its ``smoothing``-step mean) to reach tuned Adam's
  final training loss, as fractions of the horizon;
- final validation loss of each, and their ratio;
- divergence, and the late rise: the final loss on a fixed set of training rows over its
  lowest value in the run (measured every ``train_eval_every`` steps; the worst seed), next
  to tuned Adam's (the minibatch loss's final over best ``smoothing``-step mean is kept too,
  as ``minibatch_late_rise``: it depends on which batches came last);
- the step-cost ratio.

The output directory gets ``results.json`` (the protocol and each model's summary),
``curves.json`` (each model's mean training-loss curves, every 10th step: see
:func:`summarize`), ``results.md`` and ``loss_curves.png``; runs are cached under ``runs/``.
:func:`read_results` reads the first two back as one.

Usage::

  python -m metatrain.generality --optimizer cifar --out runs/generality
  python -m metatrain.generality --models pixel_mlp,flatten_conv --steps 1000 \\
      --horizons 1000 --out runs/quick
  python -m metatrain.generality --optimizer cifar --num-steps --out runs/generality

``--num-steps`` adds each learned optimizer told the horizon (``num_steps``, see
:func:`optax_learned.load`) as ``LABEL+num_steps``: one run per horizon, against the same
tuned Adam (constant learning rate, tuned per horizon).

``--merge DIR`` adds the models of an earlier suite output (another session's or machine's)
that this run did not run, so that a suite split across runs is reported as one; see
:func:`merge_results`. ``--adam-from DIR`` reads tuned Adam's side of every model from an
earlier output with the same protocol (:func:`stored_adam_side`) instead of running Adam's
grid again: for a changed learned optimizer on the same kind of machine, a third of the
suite's compute; ``results.json`` records it as ``adam_from``.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import optax

import optax_learned
from metatrain._json_io import atomic_write, jsonable
from metatrain.generality import protocol
from metatrain.generality.models import SUITE, SuiteModel

__all__ = ("adam_side", "late_rise", "main", "merge_results", "read_results", "run_model",
           "stored_adam_side", "summarize")

RESULTS_FILE = "results.json"
CURVES_FILE = "curves.json"
# A learned optimizer is compared either as one transformation (one run, read at every
# horizon) or as a function of the horizon (one run per horizon, of that many steps).
Learned = optax.GradientTransformation | Callable[[int], optax.GradientTransformation]


def smoothed(losses: np.ndarray, window: int) -> np.ndarray:
  """Trailing ``window``-step means; entry ``t`` covers steps ``t - window + 1 .. t``
  (0-based), NaN before the first full window."""
  losses = np.asarray(losses, np.float64)
  out = np.full_like(losses, np.nan)
  if len(losses) >= window:
    csum = np.cumsum(np.insert(losses, 0, 0.0))
    out[window - 1:] = (csum[window:] - csum[:-window]) / window
  return out


def _mean_train_curve(window: int, runs: list[dict[str, Any]]) -> np.ndarray:
  """The seeds' mean of their :func:`smoothed` minibatch training losses."""
  return np.mean([smoothed(r["train_losses"], window) for r in runs], axis=0)


def _final(curve: np.ndarray, horizon: int) -> float:
  return float(curve[horizon - 1])


def late_rise(run: dict[str, Any], horizon: int) -> float:
  """The loss on the fixed training rows at ``horizon`` over its lowest value until then.

  Args:
    run: a :func:`~metatrain.generality.protocol.train` result.
    horizon: a step with a ``train_eval_losses`` measurement.

  Returns:
    The ratio (at least 1), or infinity when the final loss is not finite (a divergence).
  """
  losses = [v for step, v in run["train_eval_losses"].items() if int(step) <= horizon]
  final = run["train_eval_losses"].get(str(horizon), math.nan)
  return float(final / np.nanmin(losses)) if np.isfinite(final) else math.inf


def _minibatch_late_rise(run: dict[str, Any], horizon: int, window: int) -> float:
  """The final ``window``-step mean of the minibatch loss over its best one (noisier)."""
  curve = smoothed(run["train_losses"], window)[:horizon]
  return float(curve[-1] / np.nanmin(curve)) if np.isfinite(curve[-1]) else math.inf


def _lr_label(lr: float) -> str:
  return f"adam_{lr:.0e}"


def run_model(model: SuiteModel, out_dir: pathlib.Path, config: protocol.ProtocolConfig,
              learned: dict[str, Learned], data_dir: str | None,
              log=print, fingerprints: dict[str, str] | None = None,
              adam_from: dict[str, Any] | None = None) -> dict[str, Any]:
  """Every run one model needs (cached), then its summary.

  ``learned`` maps labels to transformations, or to functions of the horizon that return
  one (such as ``lambda h: optax_learned.load("cifar", num_steps=h)``); those are run once
  per horizon, for that many steps, and cached as ``<label>@<horizon>``. ``fingerprints``
  (by label, see :func:`~metatrain.generality.protocol.optimizer_fingerprint`) keep a
  changed optimizer from reusing the cached runs of its label. ``adam_from``, a summary of
  this model from an earlier suite output under the same protocol, supplies tuned Adam's
  side (:func:`stored_adam_side`) instead of running Adam's grid.
  """
  seeds = [protocol.FIRST_SEED + i for i in range(config.seeds)]
  fingerprints = fingerprints or {}
  run = lambda label, tx, seed, config=config, cache_as=None: protocol.run_cached(
      out_dir, model, cache_as or label, tx, seed, config, data_dir, fingerprints.get(label))
  if adam_from is None:
    grid = {}
    for lr in config.adam_learning_rates:
      grid[lr] = run(_lr_label(lr), optax.adam(lr), seeds[0])
      log(f"  {model.name} adam {lr:.0e} seed {seeds[0]}: final "
          f"{_final(smoothed(grid[lr]['train_losses'], config.smoothing), config.steps):.4f}")
    winners = _winners(grid, config)
    adam_runs = {lr: [grid[lr]] + [run(_lr_label(lr), optax.adam(lr), s) for s in seeds[1:]]
                 for lr in sorted(set(winners.values()))}
    adam = adam_side(grid, winners, adam_runs, config)
  else:
    adam = stored_adam_side(adam_from)
  learned_runs, timed = {}, {}
  for label, tx in learned.items():
    if isinstance(tx, optax.GradientTransformation):
      runs = [run(label, tx, s) for s in seeds]
      learned_runs[label] = {str(h): runs for h in config.horizons}
      timed[label] = tx
    else:
      learned_runs[label] = {}
      for h in config.horizons:
        config_h = dataclasses.replace(config, steps=h, horizons=(h,))
        learned_runs[label][str(h)] = [run(label, tx(h), s, config_h, f"{label}@{h}")
                                       for s in seeds]
      timed[label] = tx(max(config.horizons))
    log(f"  {model.name} {label}: done")
  costs = {}
  if learned:
    costs = protocol.step_cost_ratio(
        model, {"adam": optax.adam(1e-3), **timed}, config.timing_reps, data_dir)
  return summarize(model, config, adam, learned_runs, costs)


def _winners(grid: dict[float, dict], config: protocol.ProtocolConfig) -> dict[str, float]:
  """Adam's best learning rate by final train and by final valid loss, per horizon."""
  winners = {}
  for horizon in config.horizons:
    def train_at(lr, horizon=horizon):
      value = _final(smoothed(grid[lr]["train_losses"], config.smoothing), horizon)
      return value if math.isfinite(value) else math.inf
    def valid_at(lr, horizon=horizon):
      return grid[lr]["valid_losses"].get(str(horizon), math.inf)
    winners[f"train_{horizon}"] = min(grid, key=train_at)
    winners[f"valid_{horizon}"] = min(grid, key=valid_at)
  return winners


def adam_side(grid: dict[float, dict], winners: dict[str, float],
              adam_runs: dict[float, list[dict]], config: protocol.ProtocolConfig
              ) -> dict[str, Any]:
  """Tuned Adam's side of a model's comparison, from its runs.

  Args:
    grid: the first seed's run of each learning rate.
    winners: :func:`_winners` of the grid.
    adam_runs: every seed's runs of each winning learning rate.
    config: the protocol.

  Returns:
    ``{"grid_final_train": {lr: loss}, "horizons": {str(h): {"train_lr", "valid_lr",
    "final_train", "final_valid", "late_rise"}}, "curves": {str(h): curve}}``; the final
    training loss is of the seeds' mean smoothed curve, the curve every 10th step of it.
  """
  window = config.smoothing
  horizons = {}
  for horizon in config.horizons:
    train_runs = adam_runs[winners[f"train_{horizon}"]]
    valid_runs = adam_runs[winners[f"valid_{horizon}"]]
    horizons[str(horizon)] = {
        "train_lr": winners[f"train_{horizon}"], "valid_lr": winners[f"valid_{horizon}"],
        "final_train": _final(_mean_train_curve(window, train_runs), horizon),
        "final_valid": float(np.mean([r["valid_losses"].get(str(horizon), math.nan)
                                      for r in valid_runs])),
        "late_rise": max(late_rise(r, horizon) for r in train_runs)}
  return {"grid_final_train": {f"{lr:.0e}": _final(smoothed(r["train_losses"], window),
                                                   config.steps)
                               for lr, r in grid.items()},
          "horizons": horizons,
          "curves": {str(h): _mean_train_curve(
              window, adam_runs[winners[f"train_{h}"]]).tolist()[::10]
                     for h in config.horizons}}


def stored_adam_side(summary: dict[str, Any]) -> dict[str, Any]:
  """:func:`adam_side` as an earlier summary of the model (:func:`summarize`) recorded it.

  Its curves are there only if the summary has ``curves`` (see :func:`read_results`).

  Raises:
    ValueError: the summary compares no learned optimizer (it records Adam's side only
      per learned optimizer).
  """
  if not summary.get("optimizers"):
    raise ValueError(f"the stored summary of {summary['model']} compares no learned "
                     "optimizer, so it records no tuned Adam to compare against")
  horizons = next(iter(summary["optimizers"].values()))["horizons"]
  return {"grid_final_train": summary["adam_grid_final_train"],
          "horizons": {h: {"train_lr": r["adam_train_lr"], "valid_lr": r["adam_valid_lr"],
                           "final_train": r["adam_final_train"],
                           "final_valid": r["adam_final_valid"],
                           "late_rise": r["adam_late_rise"]} for h, r in horizons.items()},
          "curves": summary.get("curves", {}).get("adam")}


def summarize(model: SuiteModel, config: protocol.ProtocolConfig, adam: dict[str, Any],
              learned_runs, costs) -> dict[str, Any]:
  """The per-horizon comparison of one model (see the module docstring).

  ``adam`` is tuned Adam's side (:func:`adam_side`); ``learned_runs[label][str(horizon)]``
  are the learned optimizer's runs for a horizon.
  """
  window = config.smoothing
  result = {"model": model.name, "description": model.description,
            "in_domain": model.in_domain, "batch_size": model.batch_size,
            "adam_grid_final_train": adam["grid_final_train"],
            "horizons": {}, "optimizers": {}}
  for label, runs_at in learned_runs.items():
    per_horizon = {}
    for horizon in config.horizons:
      runs = runs_at[str(horizon)]
      tuned = adam["horizons"][str(horizon)]
      target = tuned["final_train"]
      curve = _mean_train_curve(window, runs)[:horizon]
      reached = np.nonzero(curve <= target)[0]
      steps = int(reached[0]) + 1 if reached.size else None
      valid = [r["valid_losses"].get(str(horizon), math.nan) for r in runs]
      cost = costs.get(label, math.nan)
      per_horizon[str(horizon)] = {
          "adam_train_lr": tuned["train_lr"],
          "adam_valid_lr": tuned["valid_lr"],
          "adam_final_train": target,
          "final_train": _final(curve, horizon),
          "steps_to_adam_train": steps,
          "steps_fraction": None if steps is None else steps / horizon,
          "wall_clock_fraction": None if steps is None else steps / horizon * cost,
          "final_valid": float(np.mean(valid)),
          "adam_final_valid": tuned["final_valid"],
          "valid_ratio": float(np.mean(valid) / tuned["final_valid"]),
          "diverged": any(r["diverged"] for r in runs),
          "late_rise": max(late_rise(r, horizon) for r in runs),
          "adam_late_rise": tuned["late_rise"],
          "minibatch_late_rise": max(_minibatch_late_rise(r, horizon, window)
                                     for r in runs),
      }
    result["optimizers"][label] = {"step_cost_ratio": costs.get(label), "horizons": per_horizon}
  result["adam_step_ms"] = costs.get("adam_ms")
  result["curves"] = {
      **({"adam": adam["curves"]} if adam["curves"] is not None else {}),
      **{label: _mean_train_curve(window, runs_at[str(max(config.horizons))]).tolist()[::10]
         for label, runs_at in learned_runs.items()}}
  return result


def markdown_table(summaries: list[dict[str, Any]], label: str) -> str:
  """One row per model and horizon for the learned optimizer ``label``."""
  lines = ["| model | horizon | steps to Adam's train loss (x horizon) | wall-clock (x Adam's) "
           "| valid (learned / Adam) "
           "| valid ratio | diverged | late rise (learned / Adam) | step cost |",
           "|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x, spec: "never" if x is None else format(x, spec)
  for summary in summaries:
    opt = summary["optimizers"].get(label)
    if opt is None:
      continue
    name = summary["model"] + ("" if summary["in_domain"] else " (outside CIFAR-10)")
    for horizon, h in opt["horizons"].items():
      lines.append(
          f"| {name} | {horizon} | {fmt(h['steps_fraction'], '.2f')} "
          f"| {fmt(h['wall_clock_fraction'], '.2f')} "
          f"| {h['final_valid']:.3f} / {h['adam_final_valid']:.3f} | {h['valid_ratio']:.3f} "
          f"| {'yes' if h['diverged'] else 'no'} "
          f"| {h['late_rise']:.3f} / {h['adam_late_rise']:.3f} "
          f"| {opt['step_cost_ratio']:.2f}x |")
  return "\n".join(lines)


def plot(summaries: list[dict[str, Any]], path: pathlib.Path, smoothing: int) -> None:
  """One panel per model: smoothed training loss of each learned optimizer and tuned Adam
  (models without curves are left out)."""
  summaries = [s for s in summaries if "curves" in s]
  import matplotlib  # noqa: PLC0415 (only when plotting)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  cols = 4
  rows = -(-len(summaries) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, summary in zip(axes.flat, summaries, strict=False):
    curves = summary["curves"]
    adam = ([("tuned Adam", curves["adam"][max(curves["adam"], key=int)])]
            if "adam" in curves else [])
    for label, curve in adam + [(k, v) for k, v in curves.items() if k != "adam"]:
      ax.plot(np.arange(len(curve)) * 10 + 1, curve, label=label)
    ax.set_title(summary["model"], fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss ({smoothing}-step mean)")
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(summaries):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _write_json(out_dir: pathlib.Path, config: protocol.ProtocolConfig,
                summaries: list[dict[str, Any]], fingerprints: dict[str, str],
                merged_from: list[str], adam_from: str | None = None) -> None:
  """Writes ``results.json`` (the summaries without their curves) and ``curves.json``."""
  curves = {"models": {s["model"]: s["curves"] for s in summaries if "curves" in s}}
  atomic_write(out_dir / CURVES_FILE, json.dumps(jsonable(curves)))
  models = [{k: v for k, v in s.items() if k != "curves"} for s in summaries]
  atomic_write(out_dir / RESULTS_FILE, json.dumps(jsonable(
      {"protocol": config.__dict__, "fingerprints": fingerprints, "merged_from": merged_from,
       "adam_from": adam_from, "models": models, "curves_file": CURVES_FILE}), indent=1))


def read_results(out_dir: str | pathlib.Path) -> dict[str, Any]:
  """The suite's ``results.json``, each model with its ``curves`` from ``curves.json``.

  Args:
    out_dir: the suite's output directory.

  Returns:
    ``{"protocol", "models"}`` as :func:`main` summarised them (a model without curves in
    ``curves.json``, or every model when it is missing, has none).
  """
  out_dir = pathlib.Path(out_dir)
  results = json.loads((out_dir / RESULTS_FILE).read_text())
  results.pop("curves_file", None)
  if (out_dir / CURVES_FILE).is_file():
    curves = json.loads((out_dir / CURVES_FILE).read_text())["models"]
    results["models"] = [{**m, "curves": curves[m["model"]]} if m["model"] in curves else m
                         for m in results["models"]]
  return results


def merge_results(summaries: list[dict[str, Any]], config: protocol.ProtocolConfig,
                  fingerprints: dict[str, str], other_dir: str | pathlib.Path,
                  warn=print) -> list[dict[str, Any]]:
  """``summaries`` and the models of an earlier suite output that they lack, in suite order.

  Args:
    summaries: this run's model summaries (they take precedence).
    config: this run's protocol; the other output's must be the same.
    fingerprints: this run's optimizers' fingerprints by label
      (:func:`~metatrain.generality.protocol.optimizer_fingerprint`).
    other_dir: the earlier output directory (see :func:`read_results`).
    warn: called with a line when the other output records no fingerprint for a label
      (outputs before fingerprints were recorded): its optimizer is then taken on trust.

  Returns:
    The combined summaries.

  Raises:
    FileNotFoundError: ``other_dir`` has no ``results.json``.
    ValueError: the protocols differ (the keys are named), or an optimizer label has
      another fingerprint there.
  """
  other = read_results(other_dir)
  ours = json.loads(json.dumps(jsonable(config.__dict__)))
  differ = sorted(k for k in ours.keys() | other["protocol"].keys()
                  if ours.get(k) != other["protocol"].get(k))
  if differ:
    raise ValueError(f"{other_dir}: its protocol differs from this run's in {differ} "
                     f"(there: {[other['protocol'].get(k) for k in differ]}, here: "
                     f"{[ours.get(k) for k in differ]})")
  recorded = other.get("fingerprints") or {}
  for label, fingerprint in fingerprints.items():
    if label not in recorded:
      warn(f"{other_dir} records no fingerprint for {label!r}: taken to be the same optimizer")
    elif recorded[label] != fingerprint:
      raise ValueError(f"{other_dir}: optimizer {label!r} has fingerprint {recorded[label]} "
                       f"there and {fingerprint} here: another config or other weights")
  return _combined(summaries, other["models"])


def _combined(summaries: list[dict[str, Any]], others: list[dict[str, Any]]):
  """``summaries`` and the ``others`` of models they lack, in suite order."""
  have = {s["model"] for s in summaries}
  combined = summaries + [m for m in others if m["model"] not in have]
  order = {name: i for i, name in enumerate(SUITE)}
  return sorted(combined, key=lambda s: order.get(s["model"], len(order)))


def main(argv: list[str] | None = None) -> int:
  """Runs the suite from command-line arguments (see the module docstring); returns 0."""
  parser = argparse.ArgumentParser(
      prog="python -m metatrain.generality", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--optimizer", action="append", default=[],
                      help="learned optimizer(s) to compare: a bundled name or a checkpoint "
                           "directory, optionally LABEL=PATH; repeatable. None: Adam only")
  parser.add_argument("--learning-rate", type=float, default=1.0,
                      help="the learned optimizers' step multiplier (other than 1, it "
                           "is appended to their labels: LABEL_lr0.3)")
  parser.add_argument("--num-steps", action="store_true",
                      help="also run each learned optimizer told the horizon (num_steps; "
                           "one run per horizon), labelled LABEL+num_steps")
  parser.add_argument("--models", default="", help="comma-separated suite models (default all)")
  parser.add_argument("--steps", type=int, default=protocol.ProtocolConfig.steps)
  parser.add_argument("--horizons", default="1000,3000")
  parser.add_argument("--seeds", type=int, default=protocol.ProtocolConfig.seeds)
  parser.add_argument("--eval-every", type=int, default=protocol.ProtocolConfig.eval_every)
  parser.add_argument("--smoothing", type=int, default=protocol.ProtocolConfig.smoothing,
                      help="window of the training-loss mean (steps)")
  parser.add_argument("--train-eval-every", type=int,
                      default=protocol.ProtocolConfig.train_eval_every,
                      help="steps between losses on the fixed training rows (the late rise)")
  parser.add_argument("--timing-reps", type=int, default=protocol.ProtocolConfig.timing_reps)
  parser.add_argument("--data-dir", default=None,
                      help="CIFAR-10 directory (default $OPTAX_LEARNED_DATA, else TFDS)")
  parser.add_argument("--out", required=True, help="output directory (runs are cached there)")
  parser.add_argument("--merge", action="append", default=[], metavar="DIR",
                      help="an earlier suite output directory: its models that this run does "
                           "not run join the results (same protocol and optimizers); "
                           "repeatable")
  parser.add_argument("--adam-from", default=None, metavar="DIR",
                      help="an earlier suite output with the same protocol, on this kind of "
                           "machine: tuned Adam's side of each model is read from it instead "
                           "of run (Adam does not depend on the learned optimizer)")
  args = parser.parse_args(argv)

  config = protocol.ProtocolConfig(steps=args.steps, seeds=args.seeds,
                                   eval_every=args.eval_every, smoothing=args.smoothing,
                                   train_eval_every=args.train_eval_every,
                                   timing_reps=args.timing_reps,
                                   horizons=tuple(int(h) for h in args.horizons.split(",")))
  learned, fingerprints = {}, {}
  for spec in args.optimizer:
    label, sep, path = spec.partition("=")
    label, path = (label, path) if sep else (pathlib.Path(spec).name, spec)
    if args.learning_rate != 1.0:  # runs are cached by label: it must name the multiplier
      label = f"{label}_lr{args.learning_rate:g}"
    lopt, meta_params = optax_learned.load_weights(path)
    learned[label] = lopt.transform(meta_params, learning_rate=args.learning_rate)
    fingerprints[label] = protocol.optimizer_fingerprint(lopt, meta_params)
    if args.num_steps:
      learned[f"{label}+num_steps"] = (
          lambda horizon, lopt=lopt, meta_params=meta_params: lopt.transform(
              meta_params, learning_rate=args.learning_rate, num_steps=horizon))
      fingerprints[f"{label}+num_steps"] = fingerprints[label]
  # Checked before any run: a merge that cannot happen fails now, not hours later.
  warn = lambda line: print(f"warning: {line}", file=sys.stderr)
  earlier = [merge_results([], config, fingerprints, other_dir, warn=warn)
             for other_dir in args.merge]
  models = protocol.suite_models(args.models)
  stored_adam = {}
  if args.adam_from:
    stored_adam = {m["model"]: m for m in merge_results([], config, {}, args.adam_from)}
    missing = [m.name for m in models if m.name not in stored_adam]
    if missing:
      raise ValueError(f"{args.adam_from} has no summary of {missing}: no tuned Adam to "
                       "read for them")
  out_dir = pathlib.Path(args.out)
  summaries = []
  for model in models:
    print(f"{model.name}: {model.description}", flush=True)
    summaries.append(run_model(model, out_dir, config, learned, args.data_dir,
                               log=lambda line: print(line, flush=True),
                               fingerprints=fingerprints,
                               adam_from=stored_adam.get(model.name)))
  for models in earlier:
    summaries = _combined(summaries, models)
  _write_json(out_dir, config, summaries, fingerprints, args.merge, args.adam_from)
  tables = "\n\n".join(f"## {label}\n\n{markdown_table(summaries, label)}" for label in learned)
  atomic_write(out_dir / "results.md", tables + "\n")
  if learned:
    plot(summaries, out_dir / "loss_curves.png", config.smoothing)
    unplotted = [s["model"] for s in summaries if "curves" not in s]
    if unplotted:
      print(f"warning: no curves for {unplotted} (their curves.json is missing): "
            "not plotted", file=sys.stderr)
    print(tables)
  return 0


if __name__ == "__main__":
  sys.exit(main())
