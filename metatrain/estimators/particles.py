"""Particles: perturbations of the optimizer weights, mapping over them, and statistics of the
per-sample gradients they give.

Every estimator draws ``S`` antithetic perturbations ``eps_i ~ N(0, sigma^2 I)``, runs inner
training at ``theta +- eps_i`` (the particles) and returns per-sample gradients with a leading
sample axis ``[S, ...]``; the helpers here are shared by the estimators, their combiners and
:mod:`metatrain.diagnostics`.
"""

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

MetaParams = Any

__all__ = ("global_norm", "map_particles", "mean_over_elements", "mean_over_samples",
           "mean_variance", "normal_like", "sample_perturbations")


def normal_like(tree: MetaParams, key: chex.PRNGKey, num: int | None = None) -> MetaParams:
  """Standard normal draws shaped like ``tree``, with a leading ``[num]`` axis if given.

  Each leaf gets its own key (``jax.random.split(key, num_leaves)``, in leaf order).
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  lead = () if num is None else (num,)
  return treedef.unflatten([
      jax.random.normal(k, lead + jnp.shape(leaf), jnp.result_type(leaf))
      for k, leaf in zip(keys, leaves, strict=True)])


def sample_perturbations(meta_params: MetaParams, key: chex.PRNGKey, num: int,
                         sigma: float) -> MetaParams:
  """Gaussian perturbations ``[num, ...]`` of scale ``sigma`` for every leaf."""
  return jax.tree.map(lambda e: sigma * e, normal_like(meta_params, key, num))


def map_particles(fn: Callable[[Any], Any], xs: Any, chunk: int = 0) -> Any:
  """``jax.vmap(fn)(xs)`` over the leading particle axis, ``chunk`` particles at a time.

  Chunks run one after another in ``lax.scan``, each vectorised with ``vmap``; a chunk of
  one particle is not vmapped at all (``lax.map``), which on XLA:CPU ran the ConvNet unrolls
  about 20% faster than a size-1 ``vmap``. On CPU this is often faster than one wide ``vmap``
  (per-particle weights make batched matmuls slow) and it bounds memory to one chunk's.
  Chunk ``r`` holds particles ``r, r + S/chunk, r + 2 S/chunk, ...``: one from each contiguous
  block of ``S/chunk`` particles, so when the particle axis is sharded over devices in
  contiguous blocks (``chunk`` a multiple of the device count), every device works on its own
  particles.

  Args:
    fn: maps one particle's pytree to a pytree.
    xs: pytrees with a leading particle axis ``[S, ...]``.
    chunk: particles vectorised together, a divisor of ``S``; 0 (or ``S``): one ``vmap``.

  Returns:
    ``fn``'s outputs stacked along a leading particle axis, in the order of ``xs``.

  Raises:
    ValueError: ``chunk`` does not divide the number of particles.
  """
  num = jax.tree.leaves(xs)[0].shape[0]
  if chunk in (0, num):
    return jax.vmap(fn)(xs)
  if chunk < 0 or num % chunk:
    raise ValueError(f"particle_chunk must divide the {num} particles, got {chunk}")
  if chunk == 1:  # no size-1 vmap: XLA:CPU runs the unbatched ops faster
    return jax.lax.map(fn, xs)
  rows = num // chunk
  # [S] -> [chunk, rows] keeps contiguous blocks together; scan over rows, vmap over chunk.
  split = lambda x: jnp.swapaxes(x.reshape((chunk, rows) + x.shape[1:]), 0, 1)
  merge = lambda y: jnp.swapaxes(y, 0, 1).reshape((num,) + y.shape[2:])
  _, ys = jax.lax.scan(lambda carry, x: (carry, jax.vmap(fn)(x)), None,
                       jax.tree.map(split, xs))
  return jax.tree.map(merge, ys)


def mean_over_samples(samples: MetaParams) -> MetaParams:
  """The mean over the leading sample axis of every leaf."""
  return jax.tree.map(lambda s: jnp.mean(s, axis=0), samples)


def mean_over_elements(tree: MetaParams) -> jax.Array:
  """The mean of all elements of all leaves (a scalar)."""
  leaves = jax.tree.leaves(tree)
  return sum(jnp.sum(x) for x in leaves) / sum(x.size for x in leaves)


def mean_variance(samples: MetaParams) -> jax.Array:
  """Per-element variance across the leading sample axis, averaged over all elements."""
  return mean_over_elements(jax.tree.map(lambda s: jnp.var(s, axis=0), samples))


def global_norm(tree: MetaParams) -> jax.Array:
  """The L2 norm of all leaves together (``optax.tree.norm``)."""
  return optax.tree.norm(tree)
