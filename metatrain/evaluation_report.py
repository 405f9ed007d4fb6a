"""Reports of :func:`metatrain.evaluation.evaluate`'s results: JSON, Markdown and plots.

:func:`write_outputs` writes ``results.json`` and ``curves.json`` (:func:`write_json`),
``results.md`` (:func:`markdown`) and two plots of the tuned optimizers' mean losses, against
steps and against wall-clock (:func:`wall_clock_axes`). They take the results dict that
``evaluate`` returns (or that :func:`read_results` reads back); :mod:`metatrain.evaluation`
re-exports the first and :func:`markdown`.

``results.json`` holds everything but the runs' per-step curves: the protocol, the summary,
the learning-rate sweeps and, per run, its seeds, divergence flags, step costs and ``final``
(the last point of each mean curve). The curves (``steps`` and the curves of
:data:`metatrain.measurement.CURVES`, per seed and their means) are in ``curves.json``, in the
same nesting (``learned.run``, ``baselines.<name>.runs.<lr>``).
"""

import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from metatrain._json_io import atomic_write, float_array, jsonable, lr_key
from metatrain.measurement import CURVES

RESULTS_FILE = "results.json"
CURVES_FILE = "curves.json"
# What curves.json holds of a run (and of its "mean").
_RUN_CURVES = ("steps", *CURVES)


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike) -> None:
  """Writes ``results.json``, ``curves.json``, ``results.md`` and the two plots.

  Args:
    results: the results of :func:`metatrain.evaluation.evaluate`.
    out_dir: the directory (created if needed).

  The plots, ``loss_vs_step.png`` and ``loss_vs_time.png``, need the curves: results read
  back without ``curves.json`` keep the plots already there.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  write_json(results, out)
  atomic_write(out / "results.md", markdown(results))
  if _has_curves(results):
    _plot(results, out / "loss_vs_step.png", x="steps")
    _plot(results, out / "loss_vs_time.png", x="seconds")


def write_json(results: dict[str, Any], out_dir: str | os.PathLike) -> None:
  """Writes ``results.json`` and, when the runs have curves, ``curves.json`` (see above).

  Args:
    results: the results of :func:`metatrain.evaluation.evaluate`, with or without curves.
    out_dir: an existing directory.
  """
  out = pathlib.Path(out_dir)
  summary, curves = split_curves(results)
  if _has_curves(results):
    atomic_write(out / CURVES_FILE, json.dumps(jsonable(curves), allow_nan=False))
  atomic_write(out / RESULTS_FILE, json.dumps(jsonable(summary), indent=1, allow_nan=False))


def read_results(out_dir: str | os.PathLike) -> dict[str, Any]:
  """The results of an output directory, with the curves of ``curves.json`` if it exists.

  Args:
    out_dir: a directory :func:`write_outputs` wrote.

  Returns:
    The results as :func:`metatrain.evaluation.evaluate` returned them (in JSON form: NaN as
    ``None``); without ``curves.json``, the runs have only what ``results.json`` holds.
  """
  out = pathlib.Path(out_dir)
  results = json.loads((out / RESULTS_FILE).read_text())
  if (out / CURVES_FILE).is_file():
    results = join_curves(results, json.loads((out / CURVES_FILE).read_text()))
  return results


def split_curves(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """``results`` without the runs' curves (what ``results.json`` holds), and the curves.

  Args:
    results: the results of :func:`metatrain.evaluation.evaluate`.

  Returns:
    ``(summary, curves)``: ``summary`` has ``curves_file`` and, per run, ``final`` (the
    last point of each mean curve) in place of the curves; ``curves`` has the curves in the
    same nesting. The input is not modified.
  """
  summary = {**results, "curves_file": CURVES_FILE}
  curves: dict[str, Any] = {"schema_version": results.get("schema_version")}
  if results.get("learned") is not None:
    run, run_curves = _split_run(results["learned"]["run"])
    summary["learned"] = {**results["learned"], "run": run}
    curves["learned"] = {"run": run_curves}
  summary["baselines"], curves["baselines"] = {}, {}
  for name, entry in results["baselines"].items():
    split = {lr: _split_run(run) for lr, run in entry["runs"].items()}
    summary["baselines"][name] = {**entry, "runs": {lr: s[0] for lr, s in split.items()}}
    curves["baselines"][name] = {"runs": {lr: s[1] for lr, s in split.items()}}
  return summary, curves


def join_curves(results: dict[str, Any], curves: dict[str, Any]) -> dict[str, Any]:
  """Puts the curves of ``curves.json`` back into the contents of ``results.json``.

  Args:
    results: what ``results.json`` holds.
    curves: what ``curves.json`` holds.

  Returns:
    The results as :func:`split_curves` got them (``curves_file`` and ``final`` dropped).
  """
  joined = {k: v for k, v in results.items() if k != "curves_file"}
  if joined.get("learned") is not None and "learned" in curves:
    joined["learned"] = {**joined["learned"],
                         "run": _join_run(joined["learned"]["run"], curves["learned"]["run"])}
  joined["baselines"] = {}
  for name, entry in results["baselines"].items():
    runs = curves.get("baselines", {}).get(name, {}).get("runs", {})
    joined["baselines"][name] = {**entry, "runs": {
        lr: _join_run(run, runs[lr]) if lr in runs else run for lr, run in entry["runs"].items()}}
  return joined


def _split_run(run: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  if not any(k in run for k in _RUN_CURVES):
    return run, {}
  mean = run.get("mean", {})
  kept = {k: v for k, v in run.items() if k not in _RUN_CURVES}
  kept["mean"] = {k: v for k, v in mean.items() if k not in CURVES}
  kept["final"] = {k: mean[k][-1] for k in CURVES if mean.get(k) is not None}
  curves = {k: run[k] for k in _RUN_CURVES if k in run}
  curves["mean"] = {k: mean[k] for k in CURVES if k in mean}
  return kept, curves


def _join_run(run: dict[str, Any], curves: dict[str, Any]) -> dict[str, Any]:
  joined = {k: v for k, v in run.items() if k != "final"}
  joined.update({k: v for k, v in curves.items() if k != "mean"})
  joined["mean"] = {**curves.get("mean", {}), **run.get("mean", {})}
  return joined


def _has_curves(results: dict[str, Any]) -> bool:
  """Whether every tuned run has its curves (the plots need them)."""
  return all("steps" in run for run in _tuned_runs(results).values())


def markdown(results: dict[str, Any]) -> str:
  """A Markdown report of :func:`metatrain.evaluation.evaluate`'s results."""
  summary, protocol = results["summary"], results["protocol"]
  lines = [
      f"# Evaluation on `{results['task']['name']}`", "",
      f"{protocol['steps']} steps, {protocol['seeds']} seed(s) (PRNG seeds "
      f"{protocol['eval_seeds'][0]}+), evaluation every {protocol['eval_every']} steps on "
      f"{protocol['num_eval_batches']} fixed training and validation batches. Losses are means "
      f"over seeds; seconds count training steps only. Device: "
      f"{results['environment']['device_kind']}.", "",
      "| optimizer | learning rate | final train loss | final valid loss | valid accuracy "
      "| ms / step | stable |",
      "|---|---|---|---|---|---|---|",
  ]
  rows = []
  if summary["learned"] is not None:
    rows.append((f"learned (`{results['learned']['optimizer']}`)", "-", summary["learned"]))
  for name, entry in summary["baselines"].items():
    marker = " (best)" if name == summary["best_baseline"] else ""
    rows.append((f"{name}{marker}", f"{entry['learning_rate']:g}", entry))
  for label, lr, e in rows:
    stable = "diverged" if e["diverged"] else ("yes" if e["stable"] else "no")
    lines.append(f"| {label} | {lr} | {_fmt(e['final_train_loss'])} | "
                 f"{_fmt(e['final_valid_loss'])} | {_fmt(e['final_accuracy'])} | "
                 f"{_fmt(1e3 * e['seconds_per_step'], '.2f')} | {stable} |")
  if summary["comparisons"]:
    lines += [
        "", "## Learned optimizer vs tuned baselines", "",
        "Target: each baseline's final training loss. Ratios are learned / baseline (below 1: "
        "the learned optimizer reaches the target sooner).", "",
        "| baseline | target | baseline steps | learned steps | step ratio | baseline s "
        "| learned s | time ratio | step cost ratio (interleaved) | time ratio (interleaved) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in summary["comparisons"].items():
      lines.append(
          f"| {name} | {_fmt(c['target_train_loss'])} | "
          f"{_fmt(c['baseline_steps_to_target'], '.0f')} | {_fmt(c['steps_to_target'], '.0f')} "
          f"| {_fmt(c['steps_ratio'], '.2f')} | {_fmt(c['baseline_seconds_to_target'], '.3g')} "
          f"| {_fmt(c['seconds_to_target'], '.3g')} | {_fmt(c['seconds_ratio'], '.2f')} "
          f"| {_fmt(c.get('step_cost_ratio'), '.3f')} "
          f"| {_fmt(c.get('interleaved_time_ratio'), '.2f')} |")
    learned = summary["learned"]
    if learned["horizon"] is not None:
      lines += ["", f"Meta-training horizon: {learned['horizon']} steps."]
  lines += ["", "## Learning-rate sweeps (final validation loss)", ""]
  for name, b in results["baselines"].items():
    cells = [f"**{lr:g}: {_fmt(b['final_valid_loss_by_lr'][lr_key(lr)])}**"
             if lr == b["best_learning_rate"]
             else f"{lr:g}: {_fmt(b['final_valid_loss_by_lr'][lr_key(lr)])}"
             for lr in b["learning_rates"]]
    edge = " (best at the grid's edge: widen the grid)" if b["best_at_grid_edge"] else ""
    lines.append(f"- {name}: " + ", ".join(cells) + edge)
  return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: pathlib.Path, x: str) -> None:
  """Mean training and validation loss of every tuned optimizer against steps or seconds."""
  import matplotlib  # noqa: PLC0415 (only when writing outputs)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  curves = []
  for name, run in _tuned_runs(results).items():
    if name == "learned":
      curves.append((name, name, run, {"color": "k", "linewidth": 2}))
    else:
      lr = results["baselines"][name]["best_learning_rate"]
      curves.append((name, f"{name} (lr={lr:g})", run, {}))
  seconds, seconds_label = wall_clock_axes(results)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, metric, title in zip(axes, ("train_loss", "valid_loss"),
                               ("training loss", "validation loss"), strict=True):
    values = []
    for name, label, run, style in curves:
      xs = run["steps"] if x == "steps" else seconds[name]
      ys = float_array(run["mean"][metric])
      values.append(ys[np.isfinite(ys)])
      ax.plot(xs, ys, label=label, **style)
    finite = np.concatenate(values) if values else np.zeros(0)
    if finite.size and finite.min() > 0 and finite.max() > 10 * finite.min():
      ax.set_yscale("log")
    ax.set_xlabel("step" if x == "steps" else seconds_label)
    ax.set_title(f"{results['task']['name']}: {title}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def wall_clock_axes(results: dict[str, Any]) -> tuple[dict[str, np.ndarray], str]:
  """The wall-clock axis of each tuned optimizer's curves in ``loss_vs_time.png``.

  Runs trained one after another see different machine loads (and cached baselines were
  trained in other sessions), so their measured seconds are not comparable. When the results
  hold interleaved step costs for the learned optimizer and every tuned baseline, the axis is
  ``step * interleaved seconds per step``: wall-clock at equal load, the basis of
  ``interleaved_time_ratio``. Otherwise it is each run's measured training seconds.

  Args:
    results: the results dict of :func:`metatrain.evaluation.evaluate`.

  Returns:
    ``(seconds, label)``: seconds at each evaluation step by name (``"learned"`` and the
    baselines' names) and the axis label.
  """
  runs = _tuned_runs(results)
  costs = None
  if results["learned"] is not None:
    costs = results["learned"].get("step_seconds_interleaved")
  if costs is not None and set(runs) <= set(costs):
    return ({name: float_array(run["steps"]) * costs[name] for name, run in runs.items()},
            "seconds at equal load (steps x interleaved step cost)")
  return ({name: float_array(run["mean"]["seconds"]) for name, run in runs.items()},
          "training seconds (as measured)")


# -- helpers ------------------------------------------------------------------------------


def _tuned_runs(results: dict[str, Any]) -> dict[str, Any]:
  """The learned optimizer's run (first, if any) and each baseline's run at its best rate."""
  runs = {} if results["learned"] is None else {"learned": results["learned"]["run"]}
  for name, b in results["baselines"].items():
    runs[name] = b["runs"][lr_key(b["best_learning_rate"])]
  return runs


def _fmt(value: float | None, spec: str = ".4g") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return format(value, spec)
