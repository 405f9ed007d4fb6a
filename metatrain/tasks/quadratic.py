"""Linear regression: a task whose gradients are cheap and exact, for tests and quick runs."""

import dataclasses

import chex
import jax
import jax.numpy as jnp

from metatrain.tasks import base


@dataclasses.dataclass(frozen=True)
class LinearRegressionTask(base.Task):
  """Least squares ``0.5 * mean((x @ w + b - y)^2)`` on Gaussian inputs.

  The true weights come from ``seed``; inputs are scaled per feature by a log-spaced
  ``condition_number`` so the problem is ill-conditioned like real ones; targets carry
  Gaussian noise of scale ``noise``.

  Attributes:
    dim: number of input features.
    batch_size: examples per batch.
    condition_number: ratio of the largest to the smallest feature scale (squared curvature).
    noise: standard deviation of the target noise.
    init_scale: standard deviation of the initial weights.
    seed: seed of the true weights.
  """
  dim: int = 8
  batch_size: int = 32
  condition_number: float = 10.0
  noise: float = 0.1
  init_scale: float = 1.0
  seed: int = 0

  @property
  def name(self) -> str:
    return f"linear_regression_d{self.dim}"

  def load_data(self) -> base.Data:
    key = jax.random.key(self.seed)
    scales = jnp.logspace(0.0, -0.5 * jnp.log10(self.condition_number), self.dim)
    return {"w_true": jax.random.normal(key, (self.dim,)), "scales": scales}

  def init_params(self, key: chex.PRNGKey) -> base.Params:
    return {"w": self.init_scale * jax.random.normal(key, (self.dim,)), "b": jnp.zeros(())}

  def sample_batch(self, data: base.Data, key: chex.PRNGKey, split: str) -> base.Batch:
    base.check_split(split)
    key = jax.random.fold_in(key, base.SPLITS.index(split))
    x_key, noise_key = jax.random.split(key)
    x = jax.random.normal(x_key, (self.batch_size, self.dim)) * data["scales"]
    y = x @ data["w_true"] + self.noise * jax.random.normal(noise_key, (self.batch_size,))
    return {"x": x, "y": y}

  def loss(self, params: base.Params, batch: base.Batch) -> jax.Array:
    chex.assert_rank(batch["x"], 2)
    prediction = batch["x"] @ params["w"] + params["b"]
    return 0.5 * jnp.mean(jnp.square(prediction - batch["y"]))
