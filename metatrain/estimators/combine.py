"""Combiners: how an estimator joins its sides' per-sample gradients into one gradient.

A combiner takes the pathwise samples and the ES samples (either may be ``None``, for an
estimator without that side) and returns ``(gradient, diagnostics)``.

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein 2019. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML. arXiv:1810.10180, Section 4.2.
"""

from typing import Any

import jax
import jax.numpy as jnp

from metatrain.estimators.particles import mean_over_elements, mean_over_samples

MetaParams = Any

__all__ = ("inverse_variance", "mean", "merge_by_inverse_variance")


def mean(pathwise: MetaParams | None, es: MetaParams | None
         ) -> tuple[MetaParams, dict[str, jax.Array]]:
  """The mean over samples of the one side there is.

  Raises:
    ValueError: both sides or neither are given.
  """
  if (pathwise is None) == (es is None):
    raise ValueError("the mean combiner takes exactly one side's samples")
  return mean_over_samples(es if pathwise is None else pathwise), {}


def merge_by_inverse_variance(pathwise_samples: MetaParams, es_samples: MetaParams,
                              epsilon: float = 1e-20) -> tuple[MetaParams, MetaParams]:
  """Merges two batches of gradient samples per element by inverse variance.

  With per-element sample variances ``v_rp`` and ``v_es`` across the leading sample axis, the
  merged gradient is ``w * mean(rp) + (1 - w) * mean(es)`` with ``w = v_es / (v_rp + v_es)``,
  which minimises the variance of the combination of two independent estimates.

  Args:
    pathwise_samples: per-sample pathwise gradients ``[S, ...]``.
    es_samples: per-sample ES or PES gradients ``[S, ...]``.
    epsilon: guards against 0/0 when both variances vanish (then the weights are equal).

  Returns:
    ``(merged, es_weight)``: the merged gradient (no sample axis) and, per element, the weight
    ``1 - w`` given to the ES side.

  References:
    Metz et al. 2019, arXiv:1810.10180, Section 4.2.
  """
  def merge(rp, es):
    v_rp, v_es = jnp.var(rp, axis=0), jnp.var(es, axis=0)
    w = (v_es + epsilon) / (v_rp + v_es + 2 * epsilon)
    return w * jnp.mean(rp, axis=0) + (1 - w) * jnp.mean(es, axis=0), 1 - w

  merged = jax.tree.map(merge, pathwise_samples, es_samples)
  is_pair = lambda x: isinstance(x, tuple)
  return (jax.tree.map(lambda m: m[0], merged, is_leaf=is_pair),
          jax.tree.map(lambda m: m[1], merged, is_leaf=is_pair))


def inverse_variance(pathwise: MetaParams, es: MetaParams
                     ) -> tuple[MetaParams, dict[str, jax.Array]]:
  """:func:`merge_by_inverse_variance`, reporting the mean ES weight as ``es_weight``."""
  gradient, es_weight = merge_by_inverse_variance(pathwise, es)
  return gradient, {"es_weight": mean_over_elements(es_weight)}
