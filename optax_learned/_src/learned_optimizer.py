"""The per-parameter MLP learned optimizer of Metz et al. (2019) as an Optax transformation.

Every parameter element is updated by the same small MLP. Its inputs are per-element
features (gradient, parameter, momenta, second moment and normalised momenta), each
column normalised by its root mean square over the tensor, plus training-time features
``tanh(t / s - 1)`` that are the same for every element. The MLP outputs a direction ``d``
and a log-magnitude ``m`` and the update is ``-beta1 * d * exp(beta2 * m)``.

Training-time features do not vary across elements, so their contribution to the first
layer is folded into its bias once per step instead of being multiplied per element.
Likewise the per-leaf normalisation of each feature is folded into the first layer's
weights. The features of a leaf are laid out as ``[num_features, num_elements]`` rows
(elements on the minor axis), which suits the reductions and matrix products on CPU.

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML 2019. arXiv:1810.10180.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_learned._src import errors, tree_checks

MetaParams = dict[str, Any]

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh}
# Gradients are clipped to this magnitude before entering the accumulators so that their
# squares stay finite in float32 (3.4e38); the update itself never depends on the clip
# for ordinary gradients.
_MAX_GRADIENT_MAGNITUDE = 1e18
# Feature rows are normalised by their RMS; rows whose largest magnitude is below this
# are treated as if it were this, so normalisation factors stay below ~1e26 (they are
# folded into the first layer's weights, which must stay finite). Such rows (RMS below
# ~1e-26: e.g. momenta decaying after gradients became exactly zero) shrink towards zero
# instead of being blown up to unit RMS.
_MIN_NORMALIZATION_SCALE = 1e-20


class LearnedOptimizerState(NamedTuple):
  """State of the learned optimizer transformation.

  Attributes:
    count: number of updates applied so far (int32 scalar); drives the time features.
    momentum: per leaf, float32 array of shape ``(len(momentum_decays),) + leaf.shape``.
    second_moment: per leaf, float32 array of the leaf's shape.
  """
  count: jax.Array
  momentum: optax.Updates
  second_moment: optax.Updates


def _as_tuple(value: Any, name: str, kind: type) -> tuple:
  if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
    raise TypeError(f"{name} must be a sequence of {kind.__name__}, got {value!r}")
  items = tuple(value)
  for item in items:
    if isinstance(item, bool) or not isinstance(item, (int, float) if kind is float else kind):
      raise TypeError(f"{name} must be a sequence of {kind.__name__}, got {value!r}")
  return tuple(kind(item) for item in items)


@dataclasses.dataclass(frozen=True)
class LearnedOptimizer:
  """Configuration and construction of the per-parameter MLP learned optimizer.

  The configuration is frozen and round-trips through JSON with :meth:`to_dict` and
  :meth:`from_dict`. The weights (meta-parameters) are a separate pytree made by
  :meth:`init`; :meth:`transform` binds weights into an Optax transformation.

  Example:
    >>> import jax, optax, optax_learned
    >>> lopt = optax_learned.LearnedOptimizer(hidden_sizes=(8,))
    >>> meta_params = lopt.init(jax.random.key(0))
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), lopt.transform(meta_params))

  Attributes:
    hidden_sizes: widths of the MLP's hidden layers. The default ``(16,)`` (``(32, 32)``
      before 0.1.0) keeps the update cheap on CPU; see ``benchmarks/bench_update.py``.
    momentum_decays: decays of the momentum accumulators (one feature each).
    second_moment_decay: decay of the squared-gradient accumulator.
    time_scales: scales ``s`` of the training-time features ``tanh(t / s - 1)``.
    step_mult: ``beta1`` in ``beta1 * d * exp(beta2 * m)``.
    exp_mult: ``beta2`` in ``beta1 * d * exp(beta2 * m)``.
    output_init_scale: scale of the output layer at initialisation; small values make the
      untrained optimizer nearly a no-op, which keeps early meta-training stable.
    epsilon: added to the second moment before its reciprocal square root.
    activation: hidden activation, one of ``"relu"``, ``"gelu"``, ``"tanh"``.
    skip_nonfinite: if true, a step whose gradients contain NaN or Inf leaves the
      parameters (zero update) and the optimizer state (count included) unchanged, and
      contributes zeros (not NaN) to derivatives with respect to the meta-parameters. If
      false, nothing is skipped: NaN propagates into the updates and the state, and
      infinities are clipped to 1e18 like any huge gradient.

  References:
    Metz et al. 2019, "Understanding and correcting pathologies in the training of
    learned optimizers", ICML. arXiv:1810.10180.
  """
  hidden_sizes: tuple[int, ...] = (16,)
  momentum_decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)
  second_moment_decay: float = 0.999
  time_scales: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0,
                                    10000.0, 30000.0, 100000.0)
  step_mult: float = 1e-3
  exp_mult: float = 1e-3
  output_init_scale: float = 0.01
  epsilon: float = 1e-8
  activation: str = "relu"
  skip_nonfinite: bool = True

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("hidden_sizes", _as_tuple(self.hidden_sizes, "hidden_sizes", int))
    set_("momentum_decays", _as_tuple(self.momentum_decays, "momentum_decays", float))
    set_("time_scales", _as_tuple(self.time_scales, "time_scales", float))
    for name in ("step_mult", "exp_mult", "output_init_scale", "epsilon", "second_moment_decay"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
      set_(name, float(value))
    if any(size < 1 for size in self.hidden_sizes):
      raise ValueError(f"hidden_sizes must be positive, got {self.hidden_sizes}")
    if not self.momentum_decays:
      raise ValueError("momentum_decays must name at least one decay")
    if not all(0.0 <= decay < 1.0 for decay in self.momentum_decays):
      raise ValueError(f"momentum_decays must lie in [0, 1), got {self.momentum_decays}")
    if not 0.0 <= self.second_moment_decay < 1.0:
      raise ValueError(f"second_moment_decay must lie in [0, 1), got {self.second_moment_decay}")
    if any(not math.isfinite(scale) or scale <= 0 for scale in self.time_scales):
      raise ValueError(f"time_scales must be positive and finite, got {self.time_scales}")
    if self.epsilon <= 0:
      raise ValueError(f"epsilon must be positive, got {self.epsilon}")
    if not isinstance(self.activation, str) or self.activation not in _ACTIVATIONS:
      raise ValueError(
          f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
    if not isinstance(self.skip_nonfinite, bool):
      raise TypeError(f"skip_nonfinite must be a bool, got {self.skip_nonfinite!r}")

  # -- configuration --------------------------------------------------------------------

  @property
  def num_features(self) -> int:
    """Number of per-element input features of the MLP."""
    return 2 * len(self.momentum_decays) + 4

  def to_dict(self) -> dict[str, Any]:
    """The configuration as a JSON-serialisable dict (lists for tuples)."""
    return {field.name: (list(value) if isinstance(value, tuple) else value)
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]}

  @classmethod
  def from_dict(cls, config: dict[str, Any]) -> "LearnedOptimizer":
    """Builds a learned optimizer from :meth:`to_dict` output.

    Raises:
      ValueError: for unknown keys (naming them) or invalid values.
      TypeError: for values of the wrong type.
    """
    if not isinstance(config, dict):
      raise TypeError(f"the optimizer config must be a JSON object, got {type(config).__name__}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"unknown optimizer config keys {unknown}; known keys are {sorted(known)}")
    return cls(**config)

  # -- weights --------------------------------------------------------------------------

  def init(self, key: chex.PRNGKey) -> MetaParams:
    """Samples initial MLP weights (the meta-parameters).

    Args:
      key: a JAX PRNG key.

    Returns:
      A dict of float32 arrays: ``layer_{i}`` with ``w`` and ``b`` for each dense layer and
      ``time_w`` mapping the time features into the first hidden layer.
    """
    return _sample_meta_params(self, key)

  def meta_params_shapes(self) -> MetaParams:
    """The ``jax.ShapeDtypeStruct`` tree that :meth:`init` returns."""
    return jax.eval_shape(self.init, jax.random.key(0))

  # -- the transformation ---------------------------------------------------------------

  def transform(self, meta_params: MetaParams) -> optax.GradientTransformationExtraArgs:
    """Binds weights into an Optax transformation.

    Args:
      meta_params: weights from :meth:`init`, :func:`optax_learned.load_weights` or
        meta-training. May be traced (meta-training differentiates through them).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and
      ignores other extra arguments (such as ``value=``).
    """
    chex.assert_trees_all_equal_shapes(meta_params, self.meta_params_shapes())
    return optax.GradientTransformationExtraArgs(
        init=self._init_state, update=lambda u, s, p=None, **kw: self._update(meta_params, u, s, p))

  def _init_state(self, params: optax.Params) -> LearnedOptimizerState:
    tree_checks.assert_float_leaves(params, "params")
    num_momenta = len(self.momentum_decays)
    return LearnedOptimizerState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(lambda p: jnp.zeros((num_momenta,) + jnp.shape(p), jnp.float32),
                              params),
        second_moment=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params))

  def _update(self, meta_params: MetaParams, updates: optax.Updates,
              state: LearnedOptimizerState, params: optax.Params | None):
    if params is None:
      raise errors.MissingParamsError(
          "the learned optimizer needs the current parameters: call "
          "tx.update(grads, opt_state, params)")
    tree_checks.assert_float_leaves(updates, "updates")
    tree_checks.assert_float_leaves(params, "params")
    tree_checks.assert_same_structure(updates, state.second_moment, "updates", "optimizer state")
    tree_checks.assert_same_structure(params, state.second_moment, "params", "optimizer state")
    tree_checks.assert_same_structure(state.momentum, state.second_moment,
                                      "optimizer state momentum", "optimizer state second_moment")
    # Shapes of updates, params and state agree leaf by leaf (python scalars included).
    num_momenta = len(self.momentum_decays)
    chex.assert_trees_all_equal_shapes(
        jax.tree.map(_shape_dtype, updates), jax.tree.map(_shape_dtype, params),
        state.second_moment)
    chex.assert_trees_all_equal_shapes(state.momentum, jax.tree.map(
        lambda v: jax.ShapeDtypeStruct((num_momenta,) + jnp.shape(v), jnp.float32),
        state.second_moment))

    grads, treedef = jax.tree.flatten(updates)
    param_leaves = treedef.flatten_up_to(params)
    finite = None
    if self.skip_nonfinite and grads:
      # One reduction over all leaves (XLA fuses the concatenation into it).
      finite = jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(g) for g in grads])))
      # A skipped step still runs; with its gradients zeroed its arithmetic stays finite, so
      # it contributes zeros (rather than NaN) to derivatives w.r.t. the meta-parameters.
      grads = [jnp.where(finite, g, jnp.zeros_like(g)) for g in grads]
    accumulators = [self._accumulate(g, m, v) for g, m, v in zip(
        grads, treedef.flatten_up_to(state.momentum),
        treedef.flatten_up_to(state.second_moment), strict=True)]
    first_bias = (meta_params["layer_0"]["b"]
                  + self.time_features(state.count) @ meta_params["time_w"])
    steps = [self._leaf_step(meta_params, first_bias, self._feature_rows(g, p, m, v))
             for (g, m, v), p in zip(accumulators, param_leaves, strict=True)]
    new_updates = treedef.unflatten(
        [_cast_like(step, p) for step, p in zip(steps, param_leaves, strict=True)])
    new_state = LearnedOptimizerState(
        count=state.count + 1,
        momentum=treedef.unflatten([m for _, m, _ in accumulators]),
        second_moment=treedef.unflatten([v for _, _, v in accumulators]))
    if finite is not None:
      new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    # Updates match the parameters leaf by leaf in shape and in (canonical) dtype.
    chex.assert_trees_all_equal_shapes_and_dtypes(
        new_updates, jax.tree.map(_shape_dtype, params))
    return new_updates, new_state

  def time_features(self, count: jax.Array) -> jax.Array:
    """Training-time features ``tanh(t / s - 1)`` for each time scale ``s``."""
    scales = jnp.asarray(self.time_scales, jnp.float32)
    return jnp.tanh(jnp.asarray(count, jnp.float32) / scales - 1.0)

  def leaf_features(self, g: jax.Array, p: jax.Array, m: jax.Array,
                    v: jax.Array) -> jax.Array:
    """Per-element features of one leaf, as a ``[num_elements, num_features]`` matrix.

    Columns: gradient, parameter, each momentum, ``rsqrt(v + eps)``, the gradient and each
    momentum multiplied by ``rsqrt(v + eps)``; each column normalised by its RMS over the leaf.
    ``m`` and ``v`` are the accumulators already updated with ``g``.
    """
    return _normalize(self._feature_rows(g, p, m, v), axis=1).T

  def _accumulate(self, g: jax.Array, m: jax.Array,
                  v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The clipped float32 gradient, and the accumulators updated with it."""
    g = jnp.clip(jnp.asarray(g).astype(jnp.float32), -_MAX_GRADIENT_MAGNITUDE,
                 _MAX_GRADIENT_MAGNITUDE)
    decays = jnp.asarray(self.momentum_decays, jnp.float32).reshape((-1,) + (1,) * g.ndim)
    m = decays * m + (1.0 - decays) * g[None]
    v = self.second_moment_decay * v + (1.0 - self.second_moment_decay) * jnp.square(g)
    return g, m, v

  def _feature_rows(self, g: jax.Array, p: jax.Array, m: jax.Array,
                    v: jax.Array) -> jax.Array:
    """The unnormalised features of one leaf, as a ``[num_features, num_elements]`` matrix.

    Elements run along the minor axis, so that the per-feature reductions of the
    normalisation and the MLP's matrix products work on contiguous rows.
    """
    size = math.prod(jnp.shape(g))
    num_momenta = len(self.momentum_decays)
    g = jnp.reshape(g, (size,))
    p = jnp.reshape(jnp.asarray(p).astype(jnp.float32), (size,))
    m = jnp.reshape(m, (num_momenta, size))
    rsqrt_v = jax.lax.rsqrt(jnp.reshape(v, (size,)) + self.epsilon)
    blocks = [jnp.stack([g, p]), m, jnp.stack([rsqrt_v, g * rsqrt_v]), m * rsqrt_v]
    # The blocks are written in place one at a time: XLA on CPU compiles a concatenation of
    # many operands into a much slower loop.
    features = jnp.zeros((self.num_features, size), jnp.float32)
    row = 0
    for block in blocks:
      features = jax.lax.dynamic_update_slice(features, block, (row, 0))
      row += block.shape[0]
    return features

  def _leaf_step(self, meta_params: MetaParams, first_bias: jax.Array,
                 features: jax.Array) -> jax.Array:
    """The MLP's flat step for one leaf from its unnormalised ``[num_features, n]`` features.

    Normalising a feature row multiplies it by a per-leaf factor, which is applied to the
    first layer's weights (``[num_features, hidden]``) instead of to the features: that
    saves a pass over them, and one chain of small matrix products per leaf was measured
    faster on CPU than concatenating all leaves into one chain. Products are ``W.T @ x``,
    elements on the minor axis.
    """
    activation = _ACTIVATIONS[self.activation]
    num_layers = len(self.hidden_sizes) + 1
    factors = _normalization_factors(features, axis=1, keepdims=True)  # [num_features, 1]
    w0 = meta_params["layer_0"]["w"] * factors
    h = w0.T @ features + first_bias[:, None]
    for i in range(1, num_layers):  # the activation follows hidden layers only
      layer = meta_params[f"layer_{i}"]
      h = layer["w"].T @ activation(h) + layer["b"][:, None]
    return -self.step_mult * h[0] * jnp.exp(self.exp_mult * h[1])


@functools.partial(jax.jit, static_argnums=0)
def _sample_meta_params(lopt: LearnedOptimizer, key: chex.PRNGKey) -> MetaParams:
  """:meth:`LearnedOptimizer.init`, compiled once per configuration (not op by op)."""
  sizes = (lopt.num_features,) + lopt.hidden_sizes + (2,)
  keys = jax.random.split(key, len(sizes))
  meta_params: MetaParams = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    w = jax.random.normal(keys[i], (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
    if i == len(sizes) - 2:
      w = w * lopt.output_init_scale
    meta_params[f"layer_{i}"] = {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}
  meta_params["time_w"] = (
      jax.random.normal(keys[-1], (len(lopt.time_scales), sizes[1]), jnp.float32)
      / math.sqrt(lopt.num_features + len(lopt.time_scales)))
  return meta_params


def _cast_like(step: jax.Array, p: Any) -> jax.Array:
  """A flat float32 step reshaped and cast to the shape and dtype of its parameter."""
  return jnp.reshape(step, jnp.shape(p)).astype(jnp.result_type(p))


def _shape_dtype(x: Any) -> jax.ShapeDtypeStruct:
  """The shape and (canonical, as JAX computes in it) dtype of an array or scalar."""
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _normalize(x: jax.Array, axis: int, epsilon: float = 1e-12) -> jax.Array:
  """Divides ``x`` by its root mean square along ``axis``, overflow-safe.

  The values are first scaled by their largest magnitude along ``axis`` (a constant for
  differentiation, since the result does not depend on it), so huge inputs (1e30) do not
  overflow when squared, and all-zero slices give zeros with finite gradients. Zero-size
  inputs give zero-size outputs. The result is
  ``x / sqrt(mean(x**2) + epsilon * max(max|x|, 1e-20)**2)``, i.e. unit RMS unless the RMS
  is below ~1e-26, for magnitudes up to about 8e37; above that the reciprocal of the scale
  is subnormal (XLA on CPU flushes it to zero) and the result, still finite, is meaningless.
  """
  return x * _normalization_factors(x, axis, epsilon, keepdims=True)


def _normalization_factors(x: jax.Array, axis: int, epsilon: float = 1e-12,
                           keepdims: bool = False) -> jax.Array:
  """The factors by which :func:`_normalize` multiplies ``x``, reduced along ``axis``."""
  size = x.shape[axis]
  peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True, initial=0.0))
  scale = jnp.maximum(peak, _MIN_NORMALIZATION_SCALE)
  mean_square = jnp.sum(jnp.square(x / scale), axis=axis, keepdims=True) / max(size, 1)
  # At most 1e6 / 1e-20; all-zero slices get 0, so 0 * huge weights never makes a NaN.
  factors = jnp.where(peak > 0, jax.lax.rsqrt(mean_square + epsilon) / scale, 0.0)
  return factors if keepdims else jnp.squeeze(factors, axis)


def normalize_columns(x: jax.Array, epsilon: float = 1e-12) -> jax.Array:
  """Divides each column of ``x`` by its root mean square, overflow-safe.

  The columns are first scaled by their largest magnitude (a constant for differentiation,
  since the result does not depend on it), so huge inputs (1e30) do not overflow when
  squared, and all-zero columns give zeros with finite gradients. See ``_normalize``.
  """
  return _normalize(x, axis=0, epsilon=epsilon)
