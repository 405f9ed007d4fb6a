"""A hierarchical learned optimizer as an Optax transformation.

The optimizer keeps Adam's two accumulators per parameter (a momentum ``mu`` and a second
moment ``nu``, each a params-shaped tree) and learns everything Adam leaves to the user: how
large a step each tensor takes, how that changes over training, and how much of the raw
gradient to mix into the momentum. A small per-tensor MLP, called once per tensor and step,
reads scale-free features of the tensor (its shape, its parameter scale relative to the
usual fan-in initialisation, the signal-to-noise ratio of its gradients) and of training time,
and outputs the tensor's step size and mixing weight. The features read the state the step
receives (the accumulators before this step's gradient), so the network does not wait on the
gradient, and each element's accumulation and update are one pass. The per-element rule is Adam's
direction with those per-tensor coefficients::

  u = -learning_rate * (s_T * ((1 - q_T) * mu_hat + q_T * g) / (sqrt(nu_hat) + eps)
                       + weight_decay * p)

(the decoupled weight decay of AdamW, on kernels and embeddings only), so its cost per
element is close to Adam's, whatever the size of the model.

Scale robustness is built in, not only learned. The step size is a learned base rate times
``1 / fan_in`` for matrices and kernels (the scaling that μP prescribes for Adam, and that
μLO carries over to learned optimizers) and a learned constant for vectors (biases,
normalisation scales). The network's per-tensor correction of that base is bounded (at most
``max_log_correction`` in log space), so a model far from the meta-training family gets at
worst a bounded deviation from a width-scaled Adam, not an arbitrary step.

This is the hierarchical design of later learned optimizers (per-tensor networks setting
the scale of cheap per-parameter rules) applied to the per-parameter learned optimizer of
Metz et al. (2019), whose meta-training machinery ``metatrain`` implements.

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML 2019. arXiv:1810.10180.
  Yang et al. "Tensor Programs V: Tuning large neural networks via zero-shot hyperparameter
  transfer" (μP). arXiv:2203.03466.
  Therien et al. "μLO: Compute-efficient meta-generalization of learned optimizers". 2024.
  arXiv:2406.00153.
  Moudgil et al. "Learning versatile optimizers on a compute diet" (Celo). 2025.
  arXiv:2501.12670.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_learned._src import errors, tree_checks

MetaParams = dict[str, Any]

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh}
# Gradients are clipped to this magnitude before entering the accumulators so that their
# squares stay finite in float32 (3.4e38); the update never depends on the clip for
# ordinary gradients.
_MAX_GRADIENT_MAGNITUDE = 1e18
# Floor of the ratios inside the logarithms of the per-tensor features.
_TINY = 1e-30
# Features the per-tensor network reads besides the training-time features.
TENSOR_FEATURES = ("log_fan_in", "log_fan_out", "is_vector", "log_relative_scale", "log_snr")
# Elements of a tensor its statistical features are measured on (see _feature_sample).
FEATURE_SAMPLE_SIZE = 4096
# Network outputs, in order.
OUTPUTS = ("log_step_correction", "gradient_mix")


class LearnedOptimizerState(NamedTuple):
  """State of the learned optimizer transformation (the layout of ``optax.adam``'s).

  Attributes:
    count: number of updates applied so far (int32 scalar); drives the time features.
    mu: momentum, a tree of float32 arrays shaped like the parameters.
    nu: second moment, a tree of float32 arrays shaped like the parameters.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


@dataclasses.dataclass(frozen=True)
class LearnedOptimizer:
  """Configuration and construction of the hierarchical learned optimizer.

  The configuration is frozen and round-trips through JSON with :meth:`to_dict` and
  :meth:`from_dict`. The weights (meta-parameters) are a separate pytree made by
  :meth:`init`; :meth:`transform` binds weights into an Optax transformation.

  Example:
    >>> import jax, optax, optax_learned
    >>> lopt = optax_learned.LearnedOptimizer(hidden_sizes=(8,))
    >>> meta_params = lopt.init(jax.random.key(0))
    >>> tx = optax.chain(optax.add_decayed_weights(1e-4), lopt.transform(meta_params))

  Attributes:
    hidden_sizes: widths of the per-tensor MLP's hidden layers.
    beta1: decay of the momentum ``mu``.
    beta2: decay of the second moment ``nu``.
    time_scales: scales ``s`` of the training-time features ``tanh(t / s - 1)``.
    matrix_step: the initial base step of tensors with two or more dimensions, times
      ``1 / fan_in`` (``fan_in`` is the product of all but the last dimension, as Flax's
      default initialisers count it). Learned in meta-training.
    vector_step: the initial base step of scalars and vectors (biases, norm scales).
      Learned in meta-training.
    max_log_correction: bound on the network's per-tensor correction of the log step.
    initial_gradient_mix: the mixing weight ``q`` of the raw gradient at initialisation.
    output_init_scale: scale of the network's output layer at initialisation; small values
      make the untrained optimizer a width-scaled Adam.
    epsilon: added to ``sqrt(nu_hat)`` in the denominator.
    activation: hidden activation, one of ``"relu"``, ``"gelu"``, ``"tanh"``.
    anneal_steps: when the training length is not given (``num_steps=None`` in
      :meth:`transform`), every step is multiplied by ``1 / (1 + count / anneal_steps)``,
      an inverse-time decay that needs no horizon (``None``: no decay). The learned rule
      sees the step count but not the horizon; meta-trained on horizons of a few thousand
      steps, it keeps too large a step past about a thousand. Meta-training applies it
      too (the bundled ``cifar`` was meta-trained without one; its 1000 was set after).
    weight_decay: decoupled weight decay of tensors with two or more dimensions (kernels,
      embeddings; not biases or normalisation scales): each such element's update also
      subtracts ``weight_decay * lr(t) * p``, where ``lr(t)`` is the step multiplier
      (the ``learning_rate`` of :meth:`transform` times the decay of :attr:`anneal_steps`
      or of ``num_steps``), as ``optax.adamw`` multiplies its decay by its learning rate.
      ``0`` (the default): no decay. Meta-training applies it too (``cifar``'s was set
      after meta-training, on models outside meta-training and the generality suite).
    skip_nonfinite: if true, an element whose gradient is NaN or Inf gets a zero update
      and keeps its accumulators (a step whose gradients are all NaN leaves the parameters
      and the accumulators unchanged; the count still advances), and contributes zeros
      (not NaN) to derivatives with respect to the meta-parameters. Element by element,
      this costs nothing over the update itself; a whole-step check is a full extra pass
      over the gradients. If false, NaN propagates into the updates and the state, and
      infinities are clipped to 1e18 like any huge gradient.

  References:
    Metz et al. 2019, "Understanding and correcting pathologies in the training of
    learned optimizers", ICML. arXiv:1810.10180.
    Therien et al. 2024, "μLO: Compute-efficient meta-generalization of learned
    optimizers". arXiv:2406.00153.
  """
  hidden_sizes: tuple[int, ...] = (32,)
  beta1: float = 0.9
  beta2: float = 0.999
  time_scales: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0)
  matrix_step: float = 0.5
  vector_step: float = 3e-3
  max_log_correction: float = 3.0
  initial_gradient_mix: float = 0.05
  output_init_scale: float = 0.01
  epsilon: float = 1e-8
  activation: str = "relu"
  anneal_steps: float | None = None
  weight_decay: float = 0.0
  skip_nonfinite: bool = True

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("hidden_sizes", _as_tuple(self.hidden_sizes, "hidden_sizes", int))
    set_("time_scales", _as_tuple(self.time_scales, "time_scales", float))
    for name in ("beta1", "beta2", "matrix_step", "vector_step", "max_log_correction",
                 "initial_gradient_mix", "output_init_scale", "epsilon", "weight_decay"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
      set_(name, float(value))
    if any(size < 1 for size in self.hidden_sizes):
      raise ValueError(f"hidden_sizes must be positive, got {self.hidden_sizes}")
    for name in ("beta1", "beta2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
    if any(scale <= 0 for scale in self.time_scales):
      raise ValueError(f"time_scales must be positive and finite, got {self.time_scales}")
    for name in ("matrix_step", "vector_step", "max_log_correction", "epsilon"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")
    if not 0.0 < self.initial_gradient_mix < 1.0:
      raise ValueError(
          f"initial_gradient_mix must lie in (0, 1), got {self.initial_gradient_mix}")
    if not isinstance(self.activation, str) or self.activation not in _ACTIVATIONS:
      raise ValueError(
          f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
    if self.anneal_steps is not None:
      value = self.anneal_steps
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"anneal_steps must be a positive number or None, got {value!r}")
      if not math.isfinite(value) or value <= 0:
        raise ValueError(f"anneal_steps must be a positive number or None, got {value!r}")
      set_("anneal_steps", float(value))
    if not isinstance(self.skip_nonfinite, bool):
      raise TypeError(f"skip_nonfinite must be a bool, got {self.skip_nonfinite!r}")

  # -- configuration --------------------------------------------------------------------

  @property
  def num_features(self) -> int:
    """Number of inputs of the per-tensor MLP (tensor features and time features)."""
    return len(TENSOR_FEATURES) + len(self.time_scales)

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
    """Samples initial weights (the meta-parameters).

    Args:
      key: a JAX PRNG key.

    Returns:
      A dict of float32 arrays: ``layer_{i}`` with ``w`` and ``b`` for each dense layer of
      the per-tensor MLP, and ``log_base_step`` (``[matrix, vector]`` log base steps).
    """
    return _sample_meta_params(self, key)

  def meta_params_shapes(self) -> MetaParams:
    """The ``jax.ShapeDtypeStruct`` tree that :meth:`init` returns."""
    return jax.eval_shape(self.init, jax.random.key(0))

  # -- the transformation ---------------------------------------------------------------

  def transform(self, meta_params: MetaParams,
                learning_rate: optax.ScalarOrSchedule = 1.0,
                num_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
    """Binds weights into an Optax transformation.

    Args:
      meta_params: weights from :meth:`init`, :func:`optax_learned.load_weights` or
        meta-training. May be traced (meta-training differentiates through them).
      learning_rate: a multiplier of every learned step (a scalar, or a schedule of the
        step count as in Optax). The default 1.0 takes the configured steps (with the
        decay of :attr:`anneal_steps`, if any); smaller values take smaller steps. It works
        under ``optax.inject_hyperparams``.
      num_steps: the length of training, if known. Given, every step is also multiplied by
        ``optax.cosine_decay_schedule(1.0, num_steps)`` of the step count: 1 at the first
        update, decaying to 0 over ``num_steps`` updates (later updates are zero).
        ``None``, the default, applies the configured horizon-free decay
        (:attr:`anneal_steps`), or none: the learned rule does not need the horizon, but a
        known one lets it anneal like a tuned schedule.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and
      ignores other extra arguments (such as ``value=``).

    Raises:
      InvalidTreeError: ``meta_params`` not shaped as :meth:`init` returns them.
      TypeError, ValueError: ``num_steps`` not a positive integer.
    """
    tree_checks.assert_matching_shapes(meta_params, self.meta_params_shapes(),
                                       "meta_params", "the optimizer's weights")
    multiplier = _step_multiplier(learning_rate, num_steps, self.anneal_steps)
    return optax.GradientTransformationExtraArgs(
        init=self._init_state,
        update=lambda u, s, p=None, **kw: self._update(meta_params, multiplier, u, s, p))

  def _init_state(self, params: optax.Params) -> LearnedOptimizerState:
    tree_checks.assert_float_leaves(params, "params")
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    return LearnedOptimizerState(count=jnp.zeros([], jnp.int32),
                                 mu=jax.tree.map(zeros, params),
                                 nu=jax.tree.map(zeros, params))

  def _update(self, meta_params: MetaParams, learning_rate: optax.Schedule,
              updates: optax.Updates, state: LearnedOptimizerState,
              params: optax.Params | None):
    if params is None:
      raise errors.MissingParamsError(
          "the learned optimizer needs the current parameters: call "
          "tx.update(grads, opt_state, params)")
    tree_checks.assert_not_optimizer_state(params, "params")
    tree_checks.assert_float_leaves(updates, "updates")
    tree_checks.assert_float_leaves(params, "params")
    tree_checks.assert_same_structure(updates, state.nu, "updates", "optimizer state")
    tree_checks.assert_same_structure(params, state.nu, "params", "optimizer state")
    tree_checks.assert_same_structure(state.mu, state.nu, "optimizer state mu",
                                      "optimizer state nu")
    tree_checks.assert_matching_shapes(updates, params, "updates", "params")
    tree_checks.assert_matching_shapes(state.mu, params, "optimizer state mu", "params")
    tree_checks.assert_matching_shapes(state.nu, params, "optimizer state nu", "params")

    grads, treedef = jax.tree.flatten(updates)
    param_leaves = treedef.flatten_up_to(params)
    mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    # The per-tensor coefficients come from the state as this step receives it (the
    # accumulators before this gradient, the parameters before this update), so that no
    # reduction over this step's gradient stands between it and the element update: each
    # leaf's accumulation and step then fuse into one pass, and the per-tensor network runs
    # on inputs of the step. At the first update the accumulators are zero and the
    # gradient-statistics features take the same value (0) as they would after it.
    step_sizes = mixes = None
    if grads:
      features = self._tensor_features(param_leaves, mus, nus, state.count)
      step_sizes, mixes = self.tensor_coefficients(meta_params, features, state.count,
                                                   [jnp.shape(p) for p in param_leaves])
      multiplier = jnp.asarray(learning_rate(state.count), jnp.float32)
      step_sizes = step_sizes * multiplier
      decay = self.weight_decay * multiplier
    count = state.count + 1
    mu_correction, nu_correction = self._bias_corrections(count)
    new_updates, new_mus, new_nus = [], [], []
    for i, (g, m, v, p) in enumerate(zip(grads, mus, nus, param_leaves, strict=True)):
      g = jnp.asarray(g).astype(jnp.float32)
      m, v = _after(m, step_sizes[i]), _after(v, step_sizes[i])
      ok = jnp.isfinite(g) if self.skip_nonfinite else None
      if ok is not None:
        # Zeroed first, so a skipped element's arithmetic stays finite and contributes
        # zeros (rather than NaN) to derivatives w.r.t. the meta-parameters.
        g = jnp.where(ok, g, 0.0)
      g, new_m, new_v = self._accumulate(g, m, v)
      if ok is not None:  # a skipped element keeps its accumulators and takes no step
        new_m, new_v = jnp.where(ok, new_m, m), jnp.where(ok, new_v, v)
      step = self._element_step(g, new_m, new_v, step_sizes[i], mixes[i], mu_correction,
                                nu_correction)
      if self.weight_decay and jnp.ndim(p) >= 2:
        step = step - decay * jnp.asarray(p).astype(jnp.float32)
      if ok is not None:
        step = jnp.where(ok, step, 0.0)
      new_updates.append(_cast_like(step, p))
      new_mus.append(new_m)
      new_nus.append(new_v)
    new_state = LearnedOptimizerState(count=count, mu=treedef.unflatten(new_mus),
                                      nu=treedef.unflatten(new_nus))
    return treedef.unflatten(new_updates), new_state

  def time_features(self, count: jax.Array) -> jax.Array:
    """Training-time features ``tanh(t / s - 1)`` for each time scale ``s``."""
    scales = jnp.asarray(self.time_scales, jnp.float32)
    return jnp.tanh(jnp.asarray(count, jnp.float32) / scales - 1.0)

  def tensor_coefficients(self, meta_params: MetaParams, features: jax.Array,
                          count: jax.Array, shapes: list[tuple[int, ...]]
                          ) -> tuple[jax.Array, jax.Array]:
    """Per-tensor step sizes and gradient mixes from the per-tensor MLP.

    Args:
      meta_params: the optimizer's weights.
      features: ``[num_tensors, len(TENSOR_FEATURES)]`` features of each tensor.
      count: the step count before this update.
      shapes: the shape of each tensor (static).

    Returns:
      ``(step_sizes, mixes)``, each ``[num_tensors]``: the step ``s_T`` before the
      learning-rate multiplier, and the weight ``q_T`` of the raw gradient.
    """
    chex.assert_shape(features, (len(shapes), len(TENSOR_FEATURES)))
    activation = _ACTIVATIONS[self.activation]
    num_layers = len(self.hidden_sizes) + 1
    times = jnp.broadcast_to(self.time_features(count), (len(shapes), len(self.time_scales)))
    h = jnp.concatenate([features, times], axis=1)
    for i in range(num_layers):
      layer = meta_params[f"layer_{i}"]
      h = h @ layer["w"] + layer["b"]
      if i < num_layers - 1:
        h = activation(h)
    bound = self.max_log_correction
    correction = bound * jnp.tanh(h[:, 0] / bound)
    is_matrix = jnp.asarray([len(shape) >= 2 for shape in shapes])
    log_fan_in = jnp.asarray([math.log(_fan_in(shape)) for shape in shapes], jnp.float32)
    log_base = jnp.where(is_matrix, meta_params["log_base_step"][0] - log_fan_in,
                         meta_params["log_base_step"][1])
    mix_logit = math.log(self.initial_gradient_mix / (1.0 - self.initial_gradient_mix))
    return jnp.exp(log_base + correction), jax.nn.sigmoid(h[:, 1] + mix_logit)

  def _accumulate(self, g: jax.Array, m: jax.Array,
                  v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The clipped float32 gradient, and the accumulators updated with it."""
    g = jnp.clip(jnp.asarray(g).astype(jnp.float32), -_MAX_GRADIENT_MAGNITUDE,
                 _MAX_GRADIENT_MAGNITUDE)
    m = self.beta1 * m + (1.0 - self.beta1) * g
    v = self.beta2 * v + (1.0 - self.beta2) * jnp.square(g)
    return g, m, v

  def _tensor_features(self, params: list[jax.Array], mus: list[jax.Array],
                       nus: list[jax.Array], count: jax.Array) -> jax.Array:
    """The scale-free features of every tensor (see :data:`TENSOR_FEATURES`).

    ``log_relative_scale`` is the parameter RMS against ``1 / sqrt(fan_in)`` (the scale of
    the usual initialisation); ``log_snr`` is ``log(mean(mu_hat**2) / mean(nu_hat))``, near
    0 when gradients agree from step to step and strongly negative when noise dominates.
    Both are measured on at most :data:`FEATURE_SAMPLE_SIZE` elements of each tensor
    (:func:`_feature_sample`), so their cost does not grow with the tensor (a full pass over
    ``mu`` and ``nu`` alone cost about 20% of a training step of a wide MLP). The samples of
    all tensors are zero-padded to one length and reduced together: on CPU a reduction per
    tensor and statistic cost more in kernel launches than the arithmetic.

    Args:
      params: the parameter leaves.
      mus: their first accumulators.
      nus: their second accumulators.
      count: the number of updates the accumulators have seen (0: none yet).

    Returns:
      ``[len(params), len(TENSOR_FEATURES)]`` float32 features.
    """
    shapes = [jnp.shape(p) for p in params]
    samples = [[_feature_sample(jnp.asarray(x).astype(jnp.float32)) for x in leaves]
               for leaves in (params, mus, nus)]
    sizes = [sample.shape[0] for sample in samples[0]]
    static = jnp.asarray([[math.log(_fan_in(shape)) / 4.0,
                           math.log(shape[-1] if len(shape) >= 2 else 1) / 4.0,
                           float(len(shape) < 2)] for shape in shapes], jnp.float32)
    length = max(sizes)
    if not length:  # only empty tensors
      return jnp.concatenate([static, jnp.zeros([len(shapes), 2], jnp.float32)], axis=1)

    padded_p, padded_m, padded_v = (
        jnp.stack([jnp.pad(x, (0, length - x.shape[0])) for x in leaves]) for leaves in samples)
    # Finite features even where a non-finite gradient was not skipped (skip_nonfinite off).
    finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
    counts = jnp.maximum(jnp.asarray(sizes, jnp.float32), 1.0)
    mean_square_p = jnp.sum(jnp.square(padded_p), axis=1) / counts
    mean_square_m = jnp.sum(jnp.square(finite(padded_m)), axis=1) / counts
    mean_v = jnp.sum(finite(padded_v), axis=1) / counts
    # The accumulators hold `count` gradients (none at count 0, where they are all 0).
    mu_correction, nu_correction = self._bias_corrections(jnp.maximum(count, 1))
    fan_in = jnp.asarray([_fan_in(shape) for shape in shapes], jnp.float32)
    relative_scale = jnp.log(mean_square_p * fan_in + _TINY) / 2.0
    # A difference of logs: the log of a quotient underflows in its derivative when both
    # means are ~0 (a tensor whose gradients are all zero so far).
    snr = (jnp.log(mean_square_m * mu_correction ** 2 + _TINY)
           - jnp.log(mean_v * nu_correction + _TINY))
    statistics = jnp.stack([jnp.clip(relative_scale, -10.0, 10.0) / 2.0,
                            jnp.clip(snr, -20.0, 0.0) / 4.0], axis=1)
    nonempty = jnp.asarray(sizes)[:, None] > 0
    return jnp.concatenate([static, jnp.where(nonempty, statistics, 0.0)], axis=1)

  def _bias_corrections(self, num_gradients: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adam's bias corrections ``1 / (1 - beta ** n)`` of ``mu`` and ``nu`` after ``n >= 1``
    accumulated gradients."""
    n = num_gradients.astype(jnp.float32)
    return 1.0 / (1.0 - self.beta1 ** n), 1.0 / (1.0 - self.beta2 ** n)

  def _element_step(self, g: jax.Array, m: jax.Array, v: jax.Array, step_size: jax.Array,
                    mix: jax.Array, mu_correction: jax.Array,
                    nu_correction: jax.Array) -> jax.Array:
    """The per-element rule: Adam's direction with the tensor's step size and mix.

    ``-s * ((1 - q) * m_hat + q * g) / (sqrt(v_hat) + eps)`` with the bias-corrected
    ``m_hat = m * mu_correction`` and ``v_hat = v * nu_correction``. The per-tensor scalars
    are folded into two coefficients first, so each element costs two multiplications
    fewer than the formula as written (on CPU the update is bound by arithmetic as much as
    by memory traffic).
    """
    momentum_coefficient = -step_size * (1.0 - mix) * mu_correction
    gradient_coefficient = -step_size * mix
    # sqrt(v + tiny): the derivative of sqrt at an exact 0 (an element whose gradients were
    # all 0 so far) is infinite, which would turn meta-gradients into NaN.
    return ((momentum_coefficient * m + gradient_coefficient * g)
            / (jnp.sqrt(v * nu_correction + _TINY) + self.epsilon))


def _step_multiplier(learning_rate: optax.ScalarOrSchedule,
                     num_steps: int | jax.Array | None,
                     anneal_steps: float | None = None) -> optax.Schedule:
  """The multiplier of the learned steps as a schedule of the step count.

  Args:
    learning_rate: a scalar or a schedule.
    num_steps: ``None``, or the training length over which the multiplier decays to zero
      by a cosine (an integer; an integer array under ``optax.inject_hyperparams``).
    anneal_steps: without ``num_steps``, the scale of an inverse-time decay
      ``1 / (1 + count / anneal_steps)`` (``None``: no decay).

  Returns:
    ``count -> learning_rate(count) * decay(count)``.

  Raises:
    TypeError: ``num_steps`` not an integer.
    ValueError: ``num_steps`` below 1.
  """
  base = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
  if num_steps is None:
    if anneal_steps is None:
      return base
    return lambda count: base(count) / (1.0 + jnp.asarray(count, jnp.float32) / anneal_steps)
  is_int_array = isinstance(num_steps, jax.Array) and jnp.issubdtype(num_steps.dtype,
                                                                       jnp.integer)
  if isinstance(num_steps, bool) or not (isinstance(num_steps, int) or is_int_array):
    raise TypeError(f"num_steps must be a positive integer or None, got {num_steps!r}")
  if isinstance(num_steps, int) and num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer or None, got {num_steps}")

  # The cosine by hand rather than optax.cosine_decay_schedule, which checks its decay steps
  # in Python and so refuses the traced array that optax.inject_hyperparams passes.
  def schedule(count):
    progress = jnp.minimum(jnp.asarray(count, jnp.float32) / num_steps, 1.0)
    return base(count) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return schedule


def _as_tuple(value: Any, name: str, kind: type) -> tuple:
  if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
    raise TypeError(f"{name} must be a sequence of {kind.__name__}, got {value!r}")
  items = tuple(value)
  for item in items:
    if isinstance(item, bool) or not isinstance(item, (int, float) if kind is float else kind):
      raise TypeError(f"{name} must be a sequence of {kind.__name__}, got {value!r}")
  return tuple(kind(item) for item in items)


def _feature_sample(x: jax.Array) -> jax.Array:
  """At most :data:`FEATURE_SAMPLE_SIZE` elements of ``x``, flattened.

  A tensor of at most that many elements is read whole. A larger tensor of two or more
  dimensions, read as ``[fan_in, fan_out]`` rows, with ``2 <= fan_out <= 2048``, is sampled
  by ``FEATURE_SAMPLE_SIZE // fan_out`` whole rows (an input unit's weights to all outputs,
  contiguous in memory) at fixed pseudo-random positions: the sorted
  ``numpy.random.default_rng(fan_in).choice(fan_in, num_rows, replace=False)``, the same for
  every tensor with as many rows. Evenly spaced single elements of a large tensor touch a
  cache line each, nearly as much memory as a full pass, and evenly spaced rows can alias
  with the layout of the inputs (every 192nd row of a flattened RGB image is one colour at
  one image column). Anything else (vectors, rows longer than 2048) is sampled by evenly
  spaced elements, every ``size // FEATURE_SAMPLE_SIZE``-th.
  """
  flat = jnp.ravel(x)
  size = flat.shape[0]
  if size <= FEATURE_SAMPLE_SIZE:
    return flat
  width = jnp.shape(x)[-1] if jnp.ndim(x) >= 2 else 1
  if 1 < width <= FEATURE_SAMPLE_SIZE // 2:
    rows = jnp.reshape(flat, (size // width, width))
    num_rows = FEATURE_SAMPLE_SIZE // width
    chosen = np.sort(np.random.default_rng(rows.shape[0]).choice(rows.shape[0], num_rows,
                                                                   replace=False))
    return jnp.ravel(jnp.take(rows, chosen, axis=0))
  stride = size // FEATURE_SAMPLE_SIZE
  return jax.lax.slice(flat, (0,), (size,), (stride,))[:FEATURE_SAMPLE_SIZE]


def _fan_in(shape: tuple[int, ...]) -> int:
  """Inputs per output unit: the product of all but the last dimension (1 for vectors)."""
  return max(math.prod(shape[:-1]), 1) if len(shape) >= 2 else 1


@functools.partial(jax.jit, static_argnums=0)
def _sample_meta_params(lopt: LearnedOptimizer, key: chex.PRNGKey) -> MetaParams:
  """:meth:`LearnedOptimizer.init`, compiled once per configuration (not op by op)."""
  sizes = (lopt.num_features,) + lopt.hidden_sizes + (len(OUTPUTS),)
  keys = jax.random.split(key, len(sizes) - 1)
  meta_params: MetaParams = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    w = jax.random.normal(keys[i], (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
    if i == len(sizes) - 2:
      w = w * lopt.output_init_scale
    meta_params[f"layer_{i}"] = {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}
  meta_params["log_base_step"] = jnp.log(
      jnp.asarray([lopt.matrix_step, lopt.vector_step], jnp.float32))
  return meta_params


def _after(x: jax.Array, dependency: jax.Array) -> jax.Array:
  """``x`` unchanged, made to depend on the scalar ``dependency`` (adds an exact 0).

  The features read the incoming accumulators, which the update then overwrites in place
  (a training step donates them). Unless the overwrite depends on the features' result,
  XLA cannot order the two and copies every accumulator first; ``lax.optimization_barrier``
  does not help, because XLA:CPU removes barriers before it inserts copies.
  """
  return x + jnp.where(jnp.isfinite(dependency), 0.0 * dependency, 0.0)


def _cast_like(step: jax.Array, p: Any) -> jax.Array:
  """A float32 step cast to the dtype of its parameter."""
  return jnp.reshape(step, jnp.shape(p)).astype(jnp.result_type(p))
