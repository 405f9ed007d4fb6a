"""Small problems with known meta-gradients, shared by the estimator tests."""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from metatrain.tasks import base


@dataclasses.dataclass(frozen=True)
class LearnedStepSize:
  """SGD whose log learning rate is the only meta-parameter."""
  init_log_lr: float = -1.0

  def init(self, key):
    del key
    return {"log_lr": jnp.asarray(self.init_log_lr, jnp.float32)}

  def transform(self, meta_params):
    lr = jnp.exp(meta_params["log_lr"])
    return optax.GradientTransformationExtraArgs(
        init=lambda params: optax.EmptyState(),
        update=lambda g, s, p=None, **kw: (jax.tree.map(lambda x: -lr * x, g), s))


@dataclasses.dataclass(frozen=True)
class ConstantStep:
  """Moves every parameter by ``-theta`` per step: the inner losses are linear in ``theta``."""

  def init(self, key):
    del key
    return {"theta": jnp.asarray(0.5, jnp.float32)}

  def transform(self, meta_params):
    return optax.GradientTransformationExtraArgs(
        init=lambda params: optax.EmptyState(),
        update=lambda g, s, p=None, **kw: (
            jax.tree.map(lambda x: -meta_params["theta"] * jnp.ones_like(x), g), s))


@dataclasses.dataclass(frozen=True)
class DeterministicQuadratic(base.Task):
  """``0.5 * sum(curvature * x^2)`` from a fixed start: no randomness anywhere."""
  curvature: tuple[float, ...] = (1.0, 0.1)

  def init_params(self, key):
    del key
    return {"x": jnp.ones((len(self.curvature),))}

  def sample_batch(self, data, key, split):
    del data, key, split
    return {}

  def loss(self, params, batch):
    del batch
    return 0.5 * jnp.sum(jnp.asarray(self.curvature) * jnp.square(params["x"]))


@dataclasses.dataclass(frozen=True)
class NoisyLinear(base.Task):
  """Loss ``x + noise``: batch noise that antithetic partners share."""

  def init_params(self, key):
    del key
    return {"x": jnp.zeros(())}

  def sample_batch(self, data, key, split):
    del data, split
    return {"noise": jax.random.normal(key, ())}

  def loss(self, params, batch):
    return params["x"] + batch["noise"]
