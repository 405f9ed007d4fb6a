"""The pathwise (reparameterisation) side: gradients backpropagated through the unroll.

References:
  Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein 2019. "Understanding and correcting
  pathologies in the training of learned optimizers". ICML. arXiv:1810.10180, Section 3.
"""

from typing import Any

import jax

from metatrain import truncation as truncation_lib
from metatrain.estimators.particles import map_particles
from metatrain.tasks import base

MetaParams = Any

__all__ = ("pathwise_gradient",)


def pathwise_gradient(task: base.Task, lopt: truncation_lib.LearnedOptimizerLike,
                      config: truncation_lib.TruncationConfig, theta: MetaParams,
                      states: truncation_lib.InnerState, data: base.Data, *,
                      particle_chunk: int = 0, num_segments: jax.Array | int = 1
                      ) -> tuple[MetaParams, truncation_lib.InnerState,
                                 truncation_lib.UnrollOutput]:
  """Per-sample pathwise gradients through one truncation.

  For each sample ``i`` this backpropagates the truncation's mean meta-loss through the unroll
  at ``theta_i`` (e.g. ``theta + eps_i``): inner training, the learned optimizer and its
  features, second-order terms included.

  Args:
    task: the inner problem.
    lopt: the learned optimizer.
    config: truncation settings.
    theta: per-sample weights ``[S, ...]``.
    states: per-sample inner runs ``[S, ...]``.
    data: the task's arrays (shared by all samples).
    particle_chunk: samples vectorised together (see :func:`map_particles`); 0: all.
    num_segments: segments of the truncation
      (:func:`~metatrain.truncation.unroll_segments`).

  Returns:
    ``(gradients [S, ...], new_states, outputs)``.

  References:
    Metz et al. 2019, arXiv:1810.10180, Section 3.
  """
  def mean_loss(theta_i, state_i):
    new_state, out = truncation_lib.unroll_segments(task, lopt, config, theta_i, state_i, data,
                                                    num_segments)
    return truncation_lib.masked_mean(out.meta_losses, out.measured), (new_state, out)

  gradients, (new_states, outputs) = map_particles(
      lambda args: jax.grad(mean_loss, has_aux=True)(*args), (theta, states), particle_chunk)
  return gradients, new_states, outputs
