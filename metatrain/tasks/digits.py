"""An MLP classifier on scikit-learn's 8x8 handwritten digits (1,797 images, bundled offline)."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from metatrain.tasks import base
from metatrain.tasks.convnet import ACTIVATIONS, normal

NUM_FEATURES = 64
NUM_CLASSES = 10


@functools.lru_cache(maxsize=2)
def _device_data(valid_fraction: float) -> base.Data:
  """Digits as float32 inputs in [0, 1] and int32 labels; the last rows form ``"valid"``."""
  from sklearn.datasets import load_digits  # noqa: PLC0415 (slow import, only when used)

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  cut = len(y) - int(round(valid_fraction * len(y)))
  return {"train": {"x": jnp.asarray(x[:cut]), "y": jnp.asarray(y[:cut])},
          "valid": {"x": jnp.asarray(x[cut:]), "y": jnp.asarray(y[cut:])}}


@dataclasses.dataclass(frozen=True)
class DigitsMLPTask(base.Task):
  """Softmax cross-entropy of an MLP on the 8x8 digits (64 inputs scaled to [0, 1]).

  The split is fixed: the last ``valid_fraction`` of the rows (in sklearn's order) are the
  validation split. Batches are drawn with replacement inside ``jit``.

  Attributes:
    hidden_sizes: widths of the hidden layers (may be empty: logistic regression).
    activation: a key of :data:`metatrain.tasks.convnet.ACTIVATIONS`.
    init_scale: multiplier of the fan-in initialisation std (He for hidden layers, LeCun for
      the output layer).
    batch_size: examples per batch.
    valid_fraction: fraction of rows held out as the validation split.
  """
  hidden_sizes: tuple[int, ...] = (32,)
  activation: str = "relu"
  init_scale: float = 1.0
  batch_size: int = 64
  valid_fraction: float = 0.2

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
    # Lists from configs or overrides become tuples, keeping the task hashable.
    object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
    if not 0.0 < self.valid_fraction < 1.0:
      raise ValueError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}")

  @property
  def name(self) -> str:
    sizes = "x".join(map(str, self.hidden_sizes)) or "linear"
    return f"digits_mlp_{sizes}_{self.activation}"

  def load_data(self) -> base.Data:
    return _device_data(self.valid_fraction)

  def init_params(self, key: chex.PRNGKey) -> base.Params:
    sizes = (NUM_FEATURES, *self.hidden_sizes, NUM_CLASSES)
    keys = jax.random.split(key, len(sizes) - 1)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
      gain = 1.0 if i == len(sizes) - 2 else 2.0
      std = self.init_scale * np.sqrt(gain / fan_in)
      params[f"layer_{i}"] = {"w": normal(keys[i], (fan_in, fan_out), std),
                              "b": jnp.zeros((fan_out,))}
    return params

  def sample_batch(self, data: base.Data, key: chex.PRNGKey, split: str) -> base.Batch:
    base.check_split(split)
    x, y = data[split]["x"], data[split]["y"]
    chex.assert_shape(x, (None, NUM_FEATURES))
    key = jax.random.fold_in(key, base.SPLITS.index(split))
    index = jax.random.randint(key, (self.batch_size,), 0, y.shape[0])
    return {"x": x[index], "y": y[index]}

  def logits(self, params: base.Params, x: jax.Array) -> jax.Array:
    """Class logits ``[B, 10]`` for inputs ``[B, 64]``."""
    chex.assert_shape(x, (None, NUM_FEATURES))
    act = ACTIVATIONS[self.activation]
    num_layers = len(self.hidden_sizes) + 1
    for i in range(num_layers):
      x = x @ params[f"layer_{i}"]["w"] + params[f"layer_{i}"]["b"]
      if i < num_layers - 1:
        x = act(x)
    return x

  def loss(self, params: base.Params, batch: base.Batch) -> jax.Array:
    chex.assert_equal_shape_prefix([batch["x"], batch["y"]], 1)
    log_probs = jax.nn.log_softmax(self.logits(params, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], axis=-1))

  def accuracy(self, params: base.Params, batch: base.Batch) -> jax.Array:
    return jnp.mean(jnp.argmax(self.logits(params, batch["x"]), axis=-1) == batch["y"])
