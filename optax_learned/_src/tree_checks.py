"""Validation of user pytrees at the boundary of the learned optimizer."""

from typing import Any

import jax
import jax.numpy as jnp

from optax_learned._src import errors


def assert_float_leaves(tree: Any, what: str) -> None:
  """Raises if any leaf of ``tree`` is not a floating-point array.

  Args:
    tree: a pytree of arrays (or scalars).
    what: how to call the tree in the message, e.g. ``"params"``.

  Raises:
    InvalidTreeError: naming the first offending leaf path and its dtype.
  """
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in leaves_with_path:
    try:
      dtype = jnp.result_type(leaf)
    except TypeError:
      raise errors.InvalidTreeError(
          f"{what}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array; the "
          "learned optimizer only updates floating-point arrays.") from None
    if not jnp.issubdtype(dtype, jnp.floating):
      raise errors.InvalidTreeError(
          f"{what}{jax.tree_util.keystr(path)} has dtype {dtype}; the learned optimizer "
          "only updates floating-point leaves. Exclude other leaves (integer, bool, complex) "
          "with optax.masked or optax.partition.")


def assert_same_structure(tree: Any, reference: Any, what: str, reference_what: str) -> None:
  """Raises if two pytrees differ in structure, naming both structures.

  Raises:
    InvalidTreeError: when the tree structures differ.
  """
  treedef = jax.tree_util.tree_structure(tree)
  reference_treedef = jax.tree_util.tree_structure(reference)
  if treedef != reference_treedef:
    raise errors.InvalidTreeError(
        f"{what} has a different tree structure from {reference_what}.\n"
        f"  {what}: {treedef}\n  {reference_what}: {reference_treedef}\n"
        "Was the optimizer state initialised for other parameters?")
