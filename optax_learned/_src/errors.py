"""Exception types raised by optax_learned.

Errors about checkpoints and about the pytrees given to the transformation derive from
:class:`LearnedOptimizerError`, so callers can catch that family at once, and also from the
matching built-in exception (``ValueError``, ``FileNotFoundError``, ``TypeError``) so existing
handlers work. Invalid :class:`~optax_learned.LearnedOptimizer` settings raise plain
``ValueError`` or ``TypeError``. Trees whose leaves do not match (in structure, shape or
dtype, or an optimizer state passed as ``params``) raise :class:`InvalidTreeError` naming
the leaf path.
"""


class LearnedOptimizerError(Exception):
  """Base class of every error raised by optax_learned on bad input."""


class InvalidTreeError(LearnedOptimizerError, TypeError):
  """A parameter or update pytree the learned optimizer cannot handle."""


class MissingParamsError(LearnedOptimizerError, ValueError):
  """``update`` was called without the ``params`` the learned optimizer needs."""


class CheckpointError(LearnedOptimizerError):
  """Base class of every problem with a saved learned optimizer."""


class UnknownOptimizerError(CheckpointError, ValueError):
  """A bundled name that does not exist or is not a plain name."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A checkpoint path that does not exist or is not a checkpoint directory."""


class CheckpointConfigError(CheckpointError, ValueError):
  """A checkpoint whose JSON config is malformed, incomplete or has unknown keys."""


class CheckpointVersionError(CheckpointError, ValueError):
  """A checkpoint of another format version than this optax_learned reads (a newer one, or
  a version-1 checkpoint of the per-element MLP of optax_learned 0.1)."""


class CheckpointArraysError(CheckpointError, ValueError):
  """A checkpoint whose arrays are missing, truncated or do not match its config."""
