"""CIFAR-10 classification tasks: the shared data handling, and an MLP on pixels.

:class:`CifarTask` holds what every CIFAR-10 task shares: where the data comes from, the
validation and holdout rows, the resolution, batches sampled inside ``jit`` and the
softmax cross-entropy. Subclasses only define parameters and logits
(:class:`~metatrain.tasks.convnet.ConvNetTask`, :class:`MLPTask`).
"""

import abc
import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from metatrain import data as data_lib
from metatrain.tasks import base

__all__ = ("ACTIVATIONS", "CifarTask", "MLPTask", "RESOLUTIONS", "VALIDATE_ON", "normal")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "elu": jax.nn.elu,
    "swish": jax.nn.swish,
    "leaky_relu": jax.nn.leaky_relu,
}
RESOLUTIONS = (8, 16, 32)
VALIDATE_ON = ("valid", "holdout")
# Per-channel mean and standard deviation of CIFAR-10 training pixels (0-255 scale).
_MEAN = np.array([125.3, 122.9, 113.9], np.float32)
_STD = np.array([63.0, 62.1, 66.7], np.float32)


def normal(key: chex.PRNGKey, shape: tuple[int, ...], std: float) -> jax.Array:
  """Gaussian samples of ``shape`` drawn flat and reshaped.

  With ``jax_threefry_partitionable`` (the default in recent JAX), random bits of a rank-4
  shape took ~1.3 s to compile on XLA:CPU against ~0.15 s for the same count drawn flat.
  """
  return std * jax.random.normal(key, (int(np.prod(shape)),)).reshape(shape)


@functools.lru_cache(maxsize=8)
def _device_data(source: str, resolution: int, validation_size: int, holdout_size: int,
                 validate_on: str) -> base.Data:
  """CIFAR-10 train/valid at ``resolution`` as uint8/int32 device arrays, cached.

  The task's ``"valid"`` split is the loader's ``validate_on`` split (``"valid"`` or
  ``"holdout"``).
  """
  splits = data_lib.load_cifar10(source, validation_size=validation_size,
                                 holdout_size=holdout_size)
  stored = splits["train"]["image"].shape[1]
  if resolution > stored:
    raise data_lib.InvalidDataError(
        f"{source}: a task at resolution {resolution} needs images of at least that side; "
        f"this source stores {stored}x{stored}")
  sources = {"train": "train", "valid": validate_on}
  return {
      split: {"image": jnp.asarray(data_lib.resize_images(splits[name]["image"], resolution)),
              "label": jnp.asarray(splits[name]["label"])}
      for split, name in sources.items()
  }


@dataclasses.dataclass(frozen=True)
class CifarTask(base.Task, abc.ABC):
  """Softmax cross-entropy of a classifier of CIFAR-10 images; subclasses give the model.

  Images stay uint8 on the device and are normalised per channel in :meth:`sample_batch`.

  Attributes:
    activation: a key of :data:`ACTIVATIONS`.
    init_scale: multiplier of the fan-in initialisation std.
    batch_size: images per batch.
    resolution: image side, 8, 16 or 32 (average-pooled once at load time).
    data_dir: CIFAR-10 source for :func:`metatrain.data.load_cifar10` (``None``: the
      ``OPTAX_LEARNED_DATA`` directory, else TFDS).
    validation_size: training rows held out as the validation split.
    holdout_size: rows at the end of the training split used by neither split unless
      ``validate_on="holdout"`` (see :func:`metatrain.data.load_cifar10`).
    validate_on: the rows the task's ``"valid"`` batches come from: ``"valid"`` (the
      meta-validation rows) or ``"holdout"`` (for evaluations on rows meta-training never saw).
  """
  activation: str = "relu"
  init_scale: float = 1.0
  batch_size: int = 128
  resolution: int = 32
  data_dir: str | None = None
  validation_size: int = 5000
  holdout_size: int = 0
  validate_on: str = "valid"

  def __post_init__(self):
    if self.validate_on not in VALIDATE_ON:
      raise ValueError(f"validate_on must be one of {VALIDATE_ON}, got {self.validate_on!r}")
    if self.validate_on == "holdout" and self.holdout_size < 1:
      raise ValueError("validate_on='holdout' needs holdout_size > 0")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
    if self.resolution not in RESOLUTIONS:
      raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {self.resolution}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}")

  def load_data(self) -> base.Data:
    return _device_data(data_lib.resolve_source(self.data_dir), self.resolution,
                        self.validation_size, self.holdout_size, self.validate_on)

  def sample_batch(self, data: base.Data, key: chex.PRNGKey, split: str) -> base.Batch:
    base.check_split(split)
    images, labels = data[split]["image"], data[split]["label"]
    chex.assert_shape(images, (None, self.resolution, self.resolution, 3))
    chex.assert_type(images, jnp.uint8)
    key = jax.random.fold_in(key, base.SPLITS.index(split))
    index = jax.random.randint(key, (self.batch_size,), 0, labels.shape[0])
    image = (images[index].astype(jnp.float32) - _MEAN) / _STD
    return {"image": image, "label": labels[index]}

  @abc.abstractmethod
  def logits(self, params: base.Params, image: jax.Array) -> jax.Array:
    """Class logits ``[B, 10]`` for normalised images ``[B, R, R, 3]``."""

  def loss(self, params: base.Params, batch: base.Batch) -> jax.Array:
    chex.assert_equal_shape_prefix([batch["image"], batch["label"]], 1)
    logits = self.logits(params, batch["image"])
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, batch["label"][:, None], axis=-1))

  def accuracy(self, params: base.Params, batch: base.Batch) -> jax.Array:
    logits = self.logits(params, batch["image"])
    return jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])


@dataclasses.dataclass(frozen=True)
class MLPTask(CifarTask):
  """An MLP on flattened CIFAR-10 pixels: dense layers of ``hidden_sizes``, then 10 classes.

  Attributes:
    hidden_sizes: widths of the hidden layers (LeCun-normal weights, zero biases).
  """
  hidden_sizes: tuple[int, ...] = (256, 256)

  def __post_init__(self):
    super().__post_init__()
    if any(size < 1 for size in self.hidden_sizes):
      raise ValueError(f"hidden_sizes must be positive, got {self.hidden_sizes}")

  @property
  def name(self) -> str:
    widths = "-".join(str(size) for size in self.hidden_sizes) or "linear"
    return f"cifar_mlp_{self.resolution}_{widths}_{self.activation}"

  def init_params(self, key: chex.PRNGKey) -> base.Params:
    sizes = (self.resolution * self.resolution * 3,) + tuple(self.hidden_sizes) + (
        data_lib.NUM_CLASSES,)
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"dense_{i}": {"w": normal(keys[i], (fan_in, fan_out),
                                       self.init_scale * np.sqrt(1.0 / fan_in)),
                           "b": jnp.zeros((fan_out,))}
            for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))}

  def logits(self, params: base.Params, image: jax.Array) -> jax.Array:
    chex.assert_shape(image, (None, self.resolution, self.resolution, 3))
    act = ACTIVATIONS[self.activation]
    x = image.reshape(image.shape[0], -1)
    num_layers = len(self.hidden_sizes) + 1
    for i in range(num_layers):
      layer = params[f"dense_{i}"]
      x = x @ layer["w"] + layer["b"]
      if i < num_layers - 1:
        x = act(x)
    return x
