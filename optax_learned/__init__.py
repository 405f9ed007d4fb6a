"""optax_learned: learned optimizers for JAX that drop into any Optax or Flax training loop.

Example::

  import optax, optax_learned
  tx = optax_learned.load("cifar")  # an optax.GradientTransformation

References:
  Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
  optimizers", ICML. arXiv:1810.10180.
"""

from optax_learned._src.checkpoint import (
    FORMAT_VERSION,
    available,
    load,
    load_metadata,
    load_weights,
    save,
)
from optax_learned._src.errors import (
    CheckpointArraysError,
    CheckpointConfigError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    InvalidTreeError,
    LearnedOptimizerError,
    MissingParamsError,
    UnknownOptimizerError,
)
from optax_learned._src.learned_optimizer import LearnedOptimizer, LearnedOptimizerState, MetaParams

__version__ = "0.3.0"

__all__ = (
    "FORMAT_VERSION",
    "CheckpointArraysError",
    "CheckpointConfigError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointVersionError",
    "InvalidTreeError",
    "LearnedOptimizer",
    "LearnedOptimizerError",
    "LearnedOptimizerState",
    "MetaParams",
    "MissingParamsError",
    "UnknownOptimizerError",
    "available",
    "load",
    "load_metadata",
    "load_weights",
    "save",
)
