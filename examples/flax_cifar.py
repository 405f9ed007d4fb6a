"""A plain Flax training loop on CIFAR-10 with a learned optimizer beside Adam.

The learned optimizer is one line, ``optax.chain(optax_learned.load(NAME_OR_PATH))``; the rest
is an ordinary Flax linen ``TrainState`` loop on the paper's small ConvNet (three 3x3 stride-2
convolutions of 32 channels, global average pooling, a linear layer). Data comes from the
offline directory in ``$OPTAX_LEARNED_DATA`` / ``--data-dir`` (``cifar10_train.npz``) or from
TFDS; validation is carved from the training split::

  python examples/flax_cifar.py --optimizer cifar --data-dir ../shared/data/cifar10
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

import optax_learned
from metatrain import data as data_lib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MEAN = np.array([125.3, 123.0, 113.9], np.float32)
STD = np.array([63.0, 62.1, 66.7], np.float32)


class ConvNet(nn.Module):
  """Three 3x3 stride-2 convolutions of ``width`` channels, average pool, linear."""
  width: int = 32

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.relu(nn.Conv(self.width, (3, 3), strides=(2, 2), padding="SAME")(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def train(tx, splits, steps, seed, batch_size=128):
  images = {k: jnp.asarray(v["image"]) for k, v in splits.items()}
  labels = {k: jnp.asarray(v["label"]) for k, v in splits.items()}
  model = ConvNet()
  params = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, (x.astype(jnp.float32) - MEAN) / STD)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  # The data are arguments, not closed-over constants that XLA would compile into the program.
  @jax.jit
  def step(state, key, images, labels):
    idx = jax.random.randint(key, (batch_size,), 0, labels["train"].shape[0])
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, images["train"][idx], labels["train"][idx])
    return state.apply_gradients(grads=grads), loss

  @jax.jit
  def evaluate(params, images, labels):
    loss, logits = loss_fn(params, images["valid"][:2000], labels["valid"][:2000])
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels["valid"][:2000])

  key = jax.random.key(10_000 + seed)
  step(state, key, images, labels)  # compile outside the timing
  curve, seconds = [], 0.0
  for t in range(steps):
    start = time.perf_counter()
    state, loss = step(state, jax.random.fold_in(key, t), images, labels)
    loss.block_until_ready()
    seconds += time.perf_counter() - start
    if (t + 1) % 50 == 0:
      curve.append((t + 1, seconds, float(loss),
                    *map(float, evaluate(state.params, images, labels))))
  return np.asarray(curve)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--optimizer", default="cifar",
                      help="bundled learned optimizer name or checkpoint path")
  parser.add_argument("--adam-lr", type=float, default=3e-3, help="Adam's learning rate")
  parser.add_argument("--steps", type=int, default=1000, help="training steps")
  parser.add_argument("--data-dir", default=None,
                      help="directory with cifar10_train.npz (default $OPTAX_LEARNED_DATA, "
                           "else TFDS)")
  parser.add_argument("--out", default="runs/flax_cifar.png", help="where to save the plot")
  args = parser.parse_args()
  try:
    splits = data_lib.load_cifar10(args.data_dir)
  except data_lib.DataNotFoundError as e:
    raise SystemExit(f"flax_cifar.py: {e}") from None
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  runs = {f"learned ({args.optimizer})": optax.chain(optax_learned.load(args.optimizer)),
          f"adam lr={args.adam_lr:g}": optax.adam(args.adam_lr)}
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for name, tx in runs.items():
    print(f"training {name} for {args.steps} steps...", flush=True)
    curve = train(tx, splits, args.steps, seed=0)
    print(f"{name:24s} train loss {curve[-1, 2]:.4f} valid loss {curve[-1, 3]:.4f} "
          f"valid acc {curve[-1, 4]:.3f} {1e3 * curve[-1, 1] / args.steps:.1f} ms/step")
    axes[0].plot(curve[:, 0], curve[:, 3], label=name)
    axes[1].plot(curve[:, 1], curve[:, 3], label=name)
  axes[0].set(xlabel="step", ylabel="validation loss")
  axes[1].set(xlabel="training seconds", ylabel="validation loss")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
