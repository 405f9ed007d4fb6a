"""The per-parameter MLP learned optimizer of Metz et al. (2019) as an Optax transformation.

Every parameter element is updated by the same small MLP. Its inputs are per-element
features (gradient, parameter, momenta, second moment and normalised momenta), each
column normalised by its root mean square over the tensor, plus training-time features
``tanh(t / s - 1)`` that are the same for every element. The MLP outputs a direction ``d``
and a log-magnitude ``m`` and the update is ``-beta1 * d * exp(beta2 * m)``.

Training-time features do not vary across elements, so their contribution to the first
layer is folded into its bias once per step instead of being multiplied per element.

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML 2019. arXiv:1810.10180.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_learned._src import errors
from optax_learned._src import tree_checks

MetaParams = dict[str, Any]

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh}
# Gradients are clipped to this magnitude before entering the accumulators so that their
# squares stay finite in float32 (3.4e38); the update itself never depends on the clip
# for ordinary gradients.
_MAX_GRADIENT_MAGNITUDE = 1e18


class LearnedOptimizerState(NamedTuple):
  """State of the learned optimizer transformation.

  Attributes:
    count: number of updates applied so far (int32 scalar); drives the time features.
    momentum: per leaf, float32 array of shape ``leaf.shape + (len(momentum_decays),)``.
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
    hidden_sizes: widths of the MLP's hidden layers.
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
      parameters (zero update) and the optimizer state (count included) unchanged.

  References:
    Metz et al. 2019, "Understanding and correcting pathologies in the training of
    learned optimizers", ICML. arXiv:1810.10180.
  """
  hidden_sizes: tuple[int, ...] = (32, 32)
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
    if any(size < 1 for size in self.hidden_sizes):
      raise ValueError(f"hidden_sizes must be positive, got {self.hidden_sizes}")
    if not self.momentum_decays:
      raise ValueError("momentum_decays must name at least one decay")
    for decay in self.momentum_decays + (self.second_moment_decay,):
      if not 0.0 <= decay < 1.0:
        raise ValueError(f"decays must lie in [0, 1), got {decay}")
    if any(scale <= 0 for scale in self.time_scales):
      raise ValueError(f"time_scales must be positive, got {self.time_scales}")
    for name in ("step_mult", "exp_mult", "output_init_scale", "epsilon", "second_moment_decay"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
      set_(name, float(value))
    if self.epsilon <= 0:
      raise ValueError(f"epsilon must be positive, got {self.epsilon}")
    if self.activation not in _ACTIVATIONS:
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
    sizes = (self.num_features,) + self.hidden_sizes + (2,)
    keys = jax.random.split(key, len(sizes))
    meta_params: MetaParams = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      w = jax.random.normal(keys[i], (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
      if i == len(sizes) - 2:
        w = w * self.output_init_scale
      meta_params[f"layer_{i}"] = {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}
    meta_params["time_w"] = (
        jax.random.normal(keys[-1], (len(self.time_scales), sizes[1]), jnp.float32)
        / math.sqrt(self.num_features + len(self.time_scales)))
    return meta_params

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
        momentum=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p) + (num_momenta,), jnp.float32),
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
    chex.assert_trees_all_equal_shapes(updates, params, state.second_moment)

    first_bias = (meta_params["layer_0"]["b"]
                  + self.time_features(state.count) @ meta_params["time_w"])
    leaves, treedef = jax.tree.flatten(updates)
    columns = zip(leaves, treedef.flatten_up_to(params), treedef.flatten_up_to(state.momentum),
                  treedef.flatten_up_to(state.second_moment))
    results = [self._leaf_update(meta_params, first_bias, *column) for column in columns]
    new_updates, momentum, second_moment = (
        treedef.unflatten([result[i] for result in results]) for i in range(3))
    new_state = LearnedOptimizerState(state.count + 1, momentum, second_moment)

    if self.skip_nonfinite and leaves:
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
      new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_updates, params)
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
    rsqrt_v = jax.lax.rsqrt(v + self.epsilon)
    columns = jnp.concatenate(
        [g[..., None], p.astype(jnp.float32)[..., None], m, rsqrt_v[..., None],
         (g * rsqrt_v)[..., None], m * rsqrt_v[..., None]], axis=-1)
    return normalize_columns(columns.reshape(-1, self.num_features))

  def _leaf_update(self, meta_params, first_bias, g, p, m, v):
    dtype = p.dtype
    g = jnp.clip(g.astype(jnp.float32), -_MAX_GRADIENT_MAGNITUDE, _MAX_GRADIENT_MAGNITUDE)
    decays = jnp.asarray(self.momentum_decays, jnp.float32)
    m = decays * m + (1.0 - decays) * g[..., None]
    v = self.second_moment_decay * v + (1.0 - self.second_moment_decay) * jnp.square(g)
    activation = _ACTIVATIONS[self.activation]
    h = activation(self.leaf_features(g, p, m, v) @ meta_params["layer_0"]["w"] + first_bias)
    num_layers = len(self.hidden_sizes) + 1
    for i in range(1, num_layers):
      h = h @ meta_params[f"layer_{i}"]["w"] + meta_params[f"layer_{i}"]["b"]
      if i < num_layers - 1:
        h = activation(h)
    step = self.step_mult * h[:, 0] * jnp.exp(self.exp_mult * h[:, 1])
    return (-step).reshape(jnp.shape(p)).astype(dtype), m, v


def normalize_columns(x: jax.Array, epsilon: float = 1e-12) -> jax.Array:
  """Divides each column of ``x`` by its root mean square, overflow-safe.

  The columns are first scaled by their largest magnitude (a constant for differentiation,
  since the result does not depend on it), so huge inputs (1e30) do not overflow when
  squared, and all-zero columns give zeros with finite gradients.
  """
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=0))
  scaled = x / jnp.where(scale > 0, scale, 1.0)
  return scaled * jax.lax.rsqrt(jnp.mean(jnp.square(scaled), axis=0) + epsilon)
