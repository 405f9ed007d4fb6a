"""Plots of meta-training curves and evaluation results (matplotlib, PNG, no display)."""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_CURVES = ("meta_loss", "grad_norm", "es_weight", "train_loss")


def plot_metrics(metrics_path: str | pathlib.Path, out_path: str | pathlib.Path) -> None:
  """Draws the meta-training curves of a ``metrics.jsonl`` into a PNG."""
  records = [json.loads(line) for line in pathlib.Path(metrics_path).read_text().splitlines()
             if line.strip()]
  curves = [c for c in _CURVES if any(isinstance(r.get(c), (int, float)) for r in records)]
  if not records or not curves:
    return
  fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
  for ax, curve in zip(axes[0], curves, strict=True):
    points = [(r["step"], r[curve]) for r in records if isinstance(r.get(curve), (int, float))]
    steps, values = zip(*points, strict=True)
    ax.plot(steps, values)
    ax.set_xlabel("meta-step")
    ax.set_title(curve)
    if curve == "grad_norm":
      ax.set_yscale("log")
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
