"""The small ConvNet on CIFAR-10 of Metz et al. (2019): strided 3x3 convolutions, pool, linear.

The convolution has two implementations computing the same function. ``"lax"`` is
``lax.conv_general_dilated``. ``"patches"`` (the default on CPU) writes the SAME-padded strided
convolution as ``k * k`` strided slices of the padded input, concatenated into patches and
multiplied by the flattened kernel. On XLA:CPU a training step with ``lax.conv`` runs an order
of magnitude slower inside ``lax.scan`` than from a Python loop (jax-ml/jax#12868), and
meta-training runs inner steps inside ``scan``; the patches form does not suffer from this
(see ``benchmarks/conv_in_scan.py``).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metatrain import data as data_lib
from metatrain.tasks import base, cifar

CONV_IMPLS = ("auto", "patches", "lax")
HEADS = ("pool", "flatten")
# Re-exported for callers that used them from here before the tasks shared a base class.
ACTIVATIONS, RESOLUTIONS, VALIDATE_ON = cifar.ACTIVATIONS, cifar.RESOLUTIONS, cifar.VALIDATE_ON
normal = cifar.normal


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


@dataclasses.dataclass(frozen=True)
class ConvNetTask(cifar.CifarTask):
  """Softmax cross-entropy of a strided ConvNet on CIFAR-10.

  ``depth`` 3x3 convolutions of ``width`` channels with stride 2 and SAME padding, each
  followed (with ``norm``) by a per-example normalisation over height, width and channels
  with a learned per-channel scale and offset, then ``activation``; then a global average
  pool (``head="pool"``, the paper's) or a flatten (``head="flatten"``), and a linear layer
  to 10 classes. The data fields are those of :class:`~metatrain.tasks.CifarTask`; the
  initialisation is He-normal for convolutions and LeCun-normal for the output layer, times
  ``init_scale``.

  Attributes:
    width: channels of every convolution.
    depth: number of convolutions.
    head: ``"pool"`` or ``"flatten"``.
    norm: normalise each convolution's output (a layer norm with scale and offset).
    conv_impl: ``"patches"`` (fast inside ``scan`` on CPU), ``"lax"``, or ``"auto"`` (the
      default): ``"patches"`` on CPU and ``"lax"`` on GPU and TPU.
  """
  width: int = 32
  depth: int = 3
  head: str = "pool"
  norm: bool = False
  conv_impl: str = "auto"

  def __post_init__(self):
    super().__post_init__()
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
    if self.head not in HEADS:
      raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
    if min(self.width, self.depth) < 1:
      raise ValueError("width and depth must be positive")

  @property
  def name(self) -> str:
    extras = ("" if self.head == "pool" else f"_{self.head}") + ("_norm" if self.norm else "")
    return f"cifar_conv_{self.resolution}_d{self.depth}_w{self.width}_{self.activation}{extras}"

  def _head_inputs(self) -> int:
    side = self.resolution
    for _ in range(self.depth):
      side = -(-side // 2)
    return self.width * (side * side if self.head == "flatten" else 1)

  def init_params(self, key: chex.PRNGKey) -> base.Params:
    keys = jax.random.split(key, self.depth + 1)
    params, cin = {}, 3
    for i in range(self.depth):
      std = self.init_scale * np.sqrt(2.0 / (9 * cin))
      params[f"conv_{i}"] = {"w": cifar.normal(keys[i], (3, 3, cin, self.width), std),
                             "b": jnp.zeros((self.width,))}
      if self.norm:
        params[f"norm_{i}"] = {"scale": jnp.ones((self.width,))}
      cin = self.width
    fan_in = self._head_inputs()
    params["linear"] = {
        "w": cifar.normal(keys[-1], (fan_in, data_lib.NUM_CLASSES),
                          self.init_scale * np.sqrt(1.0 / fan_in)),
        "b": jnp.zeros((data_lib.NUM_CLASSES,))}
    return params

  def logits(self, params: base.Params, image: jax.Array) -> jax.Array:
    chex.assert_shape(image, (None, self.resolution, self.resolution, 3))
    impl = self.conv_impl
    if impl == "auto":
      impl = "patches" if jax.default_backend() == "cpu" else "lax"
    conv = conv_patches if impl == "patches" else conv_lax
    act = cifar.ACTIVATIONS[self.activation]
    x = image
    for i in range(self.depth):
      layer = params[f"conv_{i}"]
      x = conv(x, layer["w"], 2)
      if self.norm:
        mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=(1, 2, 3), keepdims=True) + 1e-5)
        x = x * params[f"norm_{i}"]["scale"]
      x = act(x + layer["b"])
    x = jnp.mean(x, axis=(1, 2)) if self.head == "pool" else x.reshape(x.shape[0], -1)
    return x @ params["linear"]["w"] + params["linear"]["b"]
