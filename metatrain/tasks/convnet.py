"""The small ConvNet on CIFAR-10 of Metz et al. (2019): strided 3x3 convolutions, pool, linear.

The convolution has two implementations computing the same function. ``"lax"`` is
``lax.conv_general_dilated``. ``"patches"`` (the default) writes the SAME-padded strided
convolution as ``k * k`` strided slices of the padded input, concatenated into patches and
multiplied by the flattened kernel. On XLA:CPU a training step with ``lax.conv`` runs an order
of magnitude slower inside ``lax.scan`` than from a Python loop (jax-ml/jax#12868), and
meta-training runs inner steps inside ``scan``; the patches form does not suffer from this
(see ``benchmarks/conv_in_scan.py``).
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metatrain import data as data_lib
from metatrain.tasks import base

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "elu": jax.nn.elu,
    "swish": jax.nn.swish,
    "leaky_relu": jax.nn.leaky_relu,
}
CONV_IMPLS = ("patches", "lax")
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
  return std * jax.random.normal(key, (math.prod(shape),)).reshape(shape)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, tuple[int, int]]:
  """Output size and (low, high) padding of a SAME convolution, as XLA computes them."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return out, (total // 2, total - total // 2)


def conv_patches(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  """SAME convolution as strided slices, one concatenation and one matmul.

  Args:
    x: inputs ``[B, H, W, C]``.
    w: kernel ``[kh, kw, C, O]`` (HWIO).
    stride: stride in both spatial dimensions.

  Returns:
    ``[B, ceil(H / stride), ceil(W / stride), O]``, equal to :func:`conv_lax`.
  """
  chex.assert_rank(x, 4)
  kh, kw, cin, cout = w.shape
  oh, pad_h = _same_padding(x.shape[1], kh, stride)
  ow, pad_w = _same_padding(x.shape[2], kw, stride)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  b = x.shape[0]
  slices = [
      lax.slice(xp, (0, i, j, 0), (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, cin),
                (1, stride, stride, 1))
      for i in range(kh) for j in range(kw)
  ]
  # Channel order (i, j, c) of the patches matches the row order of the reshaped HWIO kernel.
  return jnp.concatenate(slices, axis=-1) @ w.reshape(kh * kw * cin, cout)


def conv_lax(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  """SAME convolution with ``lax.conv_general_dilated`` (NHWC inputs, HWIO kernel)."""
  return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


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
class ConvNetTask(base.Task):
  """Softmax cross-entropy of a strided ConvNet on CIFAR-10.

  ``depth`` 3x3 convolutions of ``width`` channels with stride 2 and SAME padding, each
  followed by ``activation``; then a global average pool and a linear layer to 10 classes.
  Images stay uint8 on the device and are normalised per channel in :meth:`sample_batch`.

  Attributes:
    width: channels of every convolution.
    depth: number of convolutions.
    activation: a key of :data:`ACTIVATIONS`.
    init_scale: multiplier of the fan-in initialisation std (He for convolutions, LeCun for
      the output layer).
    batch_size: images per batch.
    resolution: image side, 8, 16 or 32 (average-pooled once at load time).
    conv_impl: ``"patches"`` (fast inside ``scan`` on CPU) or ``"lax"``.
    data_dir: CIFAR-10 source for :func:`metatrain.data.load_cifar10` (``None``: the
      ``OPTAX_LEARNED_DATA`` directory, else TFDS).
    validation_size: training rows held out as the validation split.
    holdout_size: rows at the end of the training split used by neither split unless
      ``validate_on="holdout"`` (see :func:`metatrain.data.load_cifar10`).
    validate_on: the rows the task's ``"valid"`` batches come from: ``"valid"`` (the
      meta-validation rows) or ``"holdout"`` (for evaluations on rows meta-training never saw).
  """
  width: int = 32
  depth: int = 3
  activation: str = "relu"
  init_scale: float = 1.0
  batch_size: int = 128
  resolution: int = 32
  conv_impl: str = "patches"
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
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
    if self.resolution not in RESOLUTIONS:
      raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {self.resolution}")
    if min(self.width, self.depth, self.batch_size) < 1:
      raise ValueError("width, depth and batch_size must be positive")

  @property
  def name(self) -> str:
    return f"cifar_conv_{self.resolution}_d{self.depth}_w{self.width}_{self.activation}"

  def load_data(self) -> base.Data:
    return _device_data(data_lib.resolve_source(self.data_dir), self.resolution,
                        self.validation_size, self.holdout_size, self.validate_on)

  def init_params(self, key: chex.PRNGKey) -> base.Params:
    keys = jax.random.split(key, self.depth + 1)
    params, cin = {}, 3
    for i in range(self.depth):
      std = self.init_scale * np.sqrt(2.0 / (9 * cin))
      params[f"conv_{i}"] = {"w": normal(keys[i], (3, 3, cin, self.width), std),
                             "b": jnp.zeros((self.width,))}
      cin = self.width
    std = self.init_scale * np.sqrt(1.0 / cin)
    params["linear"] = {"w": normal(keys[-1], (cin, data_lib.NUM_CLASSES), std),
                        "b": jnp.zeros((data_lib.NUM_CLASSES,))}
    return params

  def sample_batch(self, data: base.Data, key: chex.PRNGKey, split: str) -> base.Batch:
    base.check_split(split)
    images, labels = data[split]["image"], data[split]["label"]
    chex.assert_shape(images, (None, self.resolution, self.resolution, 3))
    chex.assert_type(images, jnp.uint8)
    key = jax.random.fold_in(key, base.SPLITS.index(split))
    index = jax.random.randint(key, (self.batch_size,), 0, labels.shape[0])
    image = (images[index].astype(jnp.float32) - _MEAN) / _STD
    return {"image": image, "label": labels[index]}

  def logits(self, params: base.Params, image: jax.Array) -> jax.Array:
    """Class logits ``[B, 10]`` for normalised images ``[B, R, R, 3]``."""
    chex.assert_shape(image, (None, self.resolution, self.resolution, 3))
    conv = conv_patches if self.conv_impl == "patches" else conv_lax
    act = ACTIVATIONS[self.activation]
    x = image
    for i in range(self.depth):
      layer = params[f"conv_{i}"]
      x = act(conv(x, layer["w"], 2) + layer["b"])
    x = jnp.mean(x, axis=(1, 2))
    return x @ params["linear"]["w"] + params["linear"]["b"]

  def loss(self, params: base.Params, batch: base.Batch) -> jax.Array:
    chex.assert_equal_shape_prefix([batch["image"], batch["label"]], 1)
    logits = self.logits(params, batch["image"])
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, batch["label"][:, None], axis=-1))

  def accuracy(self, params: base.Params, batch: base.Batch) -> jax.Array:
    logits = self.logits(params, batch["image"])
    return jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
