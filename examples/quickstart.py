"""Quickstart: a bundled learned optimizer beside tuned Adam in a plain Flax training loop.

Trains a small Flax MLP on scikit-learn's 8x8 digits (shipped with scikit-learn, no
download) with ``optax_learned.load("digits")`` and with Adam at three learning rates, prints a
table and saves ``runs/quickstart.png``. About a minute on 2 CPU cores::

  python examples/quickstart.py [--steps 300] [--out runs/quickstart.png]
"""

import argparse
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax.training import train_state
from sklearn.datasets import load_digits

import optax_learned

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MLP(nn.Module):
  """A 64-32-10 ReLU classifier."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))


def load_data():
  digits = load_digits()
  x = jnp.asarray(digits.data / 16.0, jnp.float32)
  y = jnp.asarray(digits.target, jnp.int32)
  cut = int(0.8 * len(y))  # the last 20% of rows are the validation split
  return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def cross_entropy(params, apply_fn, x, y):
  logits = apply_fn({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def train(tx, train_data, valid_data, steps, seed, batch_size=64):
  """A plain Flax loop: jitted step, batches sampled inside jit. Returns curves."""
  model = MLP()
  params = model.init(jax.random.key(seed), train_data[0][:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def step(state, key):
    idx = jax.random.randint(key, (batch_size,), 0, train_data[0].shape[0])
    grad_fn = jax.value_and_grad(cross_entropy, has_aux=True)
    (loss, _), grads = grad_fn(state.params, state.apply_fn, train_data[0][idx],
                               train_data[1][idx])
    return state.apply_gradients(grads=grads), loss

  @jax.jit
  def evaluate(params):
    train_loss, _ = cross_entropy(params, model.apply, *train_data)
    valid_loss, logits = cross_entropy(params, model.apply, *valid_data)
    return train_loss, valid_loss, jnp.mean(jnp.argmax(logits, -1) == valid_data[1])

  key = jax.random.key(1000 + seed)
  state, _ = step(state, key)  # compile outside the timing
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  curve, seconds = [], 0.0
  for t in range(steps):
    start = time.perf_counter()
    state, loss = step(state, jax.random.fold_in(key, t))
    loss.block_until_ready()
    seconds += time.perf_counter() - start
    if (t + 1) % 10 == 0:
      curve.append((t + 1, *map(float, evaluate(state.params))))
  return np.asarray(curve), seconds / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="training steps per run")
  parser.add_argument("--seeds", type=int, default=2, help="seeds per optimizer")
  parser.add_argument("--out", default="runs/quickstart.png",
                      help="where to save the plot (runs/ is ignored by git)")
  args = parser.parse_args()
  train_data, valid_data = load_data()
  print(f"bundled learned optimizers: {optax_learned.available()}")

  candidates = {"learned (digits)": optax_learned.load("digits")}
  for lr in (1e-3, 3e-3, 1e-2):
    candidates[f"adam lr={lr:g}"] = optax.adam(lr)
  results = {}
  for name, tx in candidates.items():
    runs = [train(tx, train_data, valid_data, args.steps, seed) for seed in range(args.seeds)]
    results[name] = (np.mean([c for c, _ in runs], axis=0), np.mean([s for _, s in runs]))
  adams = [n for n in results if n.startswith("adam")]
  best_adam = min(adams, key=lambda n: results[n][0][-1, 2])  # by final validation loss

  final = results[best_adam][0][-1]
  print(f"\n{args.steps} steps, mean of {args.seeds} seeds; best Adam by validation loss: "
        f"{best_adam}\n")
  print(f"{'optimizer':18s} {'train loss':>10s} {'valid loss':>10s} {'valid acc':>9s} "
        f"{'ms/step':>8s} {'steps to best-Adam train / valid loss':>38s}")
  for name, (curve, per_step) in results.items():
    reached = [np.nonzero(curve[:, column] <= final[column])[0] for column in (1, 2)]
    to_target = " / ".join(str(int(curve[r[0], 0])) if len(r) else "never" for r in reached)
    print(f"{name:18s} {curve[-1, 1]:10.4f} {curve[-1, 2]:10.4f} {curve[-1, 3]:9.3f} "
          f"{1e3 * per_step:8.3f} {to_target:>38s}")

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for name, (curve, _) in results.items():
    style = "-" if name.startswith("learned") else "--"
    axes[0].plot(curve[:, 0], curve[:, 1], style, label=name)
    axes[1].plot(curve[:, 0], curve[:, 2], style, label=name)
  for ax, title in zip(axes, ("training loss", "validation loss"), strict=True):
    ax.set(xlabel="step", title=title, yscale="log")
  axes[0].legend()
  fig.tight_layout()
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print(f"\nsaved {args.out}")


if __name__ == "__main__":
  main()
