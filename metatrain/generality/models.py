"""The generality suite's models: ordinary Flax linen modules, written as users write them.

None of these is in the meta-training family of the bundled optimizers (``metatrain list``):
they use Flax's own layers and initialisers, 32x32 inputs, stride-1 convolutions,
max-pooling, BatchNorm, residual blocks, attention, and widths and batch sizes the family
does not sample. Two models are outside CIFAR-10 altogether: a character-level language
model and the digits MLP.
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ("SUITE", "SuiteModel")

NUM_CLASSES = 10


class FlattenConvNet(nn.Module):
  """Three 3x3 stride-2 convolutions of 32 channels and a flatten + dense head."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    for _ in range(3):
      x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
    return nn.Dense(NUM_CLASSES)(x.reshape((x.shape[0], -1)))


class BatchNormConvNet(nn.Module):
  """A stride-2 convolution of 16, then stride-1 convolutions of 32 and 64 with BatchNorm
  and max-pooling, global pool."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    x = nn.relu(norm()(nn.Conv(16, (3, 3), strides=(2, 2), use_bias=False)(x)))
    for width in (32, 64):
      x = nn.relu(norm()(nn.Conv(width, (3, 3), use_bias=False)(x)))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))


class ResidualBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a (projected) skip connection."""
  width: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.width, (3, 3), strides=(self.stride,) * 2, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = norm()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.width, (1, 1), strides=(self.stride,) * 2, use_bias=False)(x))
    return nn.relu(x + y)


class SmallResNet(nn.Module):
  """A stride-2 stem of 16 channels, residual blocks of 16 and 32, global pool."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
    x = ResidualBlock(16, 1)(x, train)
    x = ResidualBlock(32, 2)(x, train)
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))


class WideConvNet(nn.Module):
  """Stride-2 convolutions of 32, 64 and 128 channels with GELU, global pool."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    for width in (32, 64, 128):
      x = nn.gelu(nn.Conv(width, (3, 3), strides=(2, 2))(x))
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))


class NarrowConvNet(nn.Module):
  """Three stride-2 convolutions of 16 channels with tanh, global pool."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    for _ in range(3):
      x = jnp.tanh(nn.Conv(16, (3, 3), strides=(2, 2))(x))
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))


class VGGLike(nn.Module):
  """Conv-conv-pool twice (32 and 64 channels, LayerNorm-free), a dense hidden layer of 128."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x)), (2, 2), strides=(2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
    return nn.Dense(NUM_CLASSES)(x)


class PixelMLP(nn.Module):
  """An MLP on flattened pixels, 3072-256-256-10 (855k parameters)."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.reshape((x.shape[0], -1))
    for _ in range(2):
      x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(NUM_CLASSES)(x)


class SoftmaxRegression(nn.Module):
  """Multinomial logistic regression on flattened pixels."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    return nn.Dense(NUM_CLASSES)(x.reshape((x.shape[0], -1)))


class PatchTransformer(nn.Module):
  """8x8 patches embedded to 64 dimensions, two pre-norm attention blocks, mean pool."""
  dim: int = 64
  heads: int = 4

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.dim, (8, 8), strides=(8, 8), padding="VALID")(x)
    x = x.reshape((x.shape[0], -1, self.dim))
    x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
    for _ in range(2):
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
      y = nn.gelu(nn.Dense(2 * self.dim)(nn.LayerNorm()(x)))
      x = x + nn.Dense(self.dim)(y)
    return nn.Dense(NUM_CLASSES)(jnp.mean(nn.LayerNorm()(x), axis=1))


class CharTransformer(nn.Module):
  """A causal character-level Transformer LM: embedding 64, two blocks, 4 heads."""
  vocab_size: int
  dim: int = 64
  heads: int = 4

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    x = nn.Embed(self.vocab_size, self.dim)(tokens)
    x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
    mask = nn.make_causal_mask(tokens)
    for _ in range(2):
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x),
                                                                    mask=mask)
      x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x))))
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


class DigitsMLP(nn.Module):
  """The digits MLP, 64-32-10, as a Flax module."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    return nn.Dense(NUM_CLASSES)(nn.relu(nn.Dense(32)(x)))


@dataclasses.dataclass(frozen=True)
class SuiteModel:
  """One model of the suite.

  Attributes:
    name: the row name in reports.
    make: builds the Flax module (``vocab_size`` is passed to language models).
    dataset: ``"cifar10"``, ``"text"`` or ``"digits"``.
    batch_size: examples per training step.
    in_domain: whether the bundled ``cifar`` optimizer targets this model (CIFAR-10).
    description: one line for reports.
  """
  name: str
  make: Callable[..., nn.Module]
  dataset: str
  batch_size: int
  in_domain: bool
  description: str


SUITE: dict[str, SuiteModel] = {m.name: m for m in (
    SuiteModel("flatten_conv", FlattenConvNet, "cifar10", 64, True,
               "3x32 stride-2 convs, flatten + dense head"),
    SuiteModel("batchnorm_maxpool", BatchNormConvNet, "cifar10", 32, True,
               "convs 16 (stride 2), 32/64 (stride 1), BatchNorm, max-pool, global pool"),
    SuiteModel("resnet", SmallResNet, "cifar10", 32, True,
               "stride-2 stem, residual blocks 16/32 with BatchNorm"),
    SuiteModel("wide_conv", WideConvNet, "cifar10", 32, True,
               "stride-2 convs 32/64/128, GELU, global pool"),
    SuiteModel("narrow_conv_b256", NarrowConvNet, "cifar10", 256, True,
               "3x16 stride-2 convs, tanh, global pool, batch 256"),
    SuiteModel("vgg_dense_head", VGGLike, "cifar10", 32, True,
               "conv/max-pool 32/64, dense 128 head, batch 32"),
    SuiteModel("pixel_mlp", PixelMLP, "cifar10", 128, True,
               "MLP 3072-256-256-10 on pixels (855k parameters)"),
    SuiteModel("softmax_regression_b512", SoftmaxRegression, "cifar10", 512, True,
               "logistic regression on pixels, batch 512"),
    SuiteModel("patch_transformer", PatchTransformer, "cifar10", 64, True,
               "8x8 patches, 2 attention blocks of 64"),
    SuiteModel("char_lm", CharTransformer, "text", 32, False,
               "character-level Transformer LM, 2 blocks of 64, context 32"),
    SuiteModel("digits_mlp", DigitsMLP, "digits", 64, False,
               "MLP 64-32-10 on sklearn's 8x8 digits"),
)}


def count_params(params) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(jnp.size(x)) for x in jax.tree.leaves(params))
