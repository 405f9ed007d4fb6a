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


def assert_matching_shapes(tree: Any, reference: Any, what: str, reference_what: str) -> None:
  """Raises if leaves of two pytrees of one structure differ in shape, naming the leaf.

  Args:
    tree: a pytree of arrays, scalars or ``jax.ShapeDtypeStruct``.
    reference: a pytree of the same kind.
    what: how to call ``tree`` in the message, e.g. ``"updates"``.
    reference_what: how to call ``reference``.

  Raises:
    InvalidTreeError: naming the structures when they differ, or the first leaf path whose
      shapes differ with both shapes.
  """
  assert_same_structure(tree, reference, what, reference_what)
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  for (path, leaf), expected in zip(leaves_with_path, jax.tree.leaves(reference), strict=True):
    if jnp.shape(leaf) != jnp.shape(expected):
      raise errors.InvalidTreeError(
          f"{what}{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, but "
          f"{reference_what}{jax.tree_util.keystr(path)} has shape {jnp.shape(expected)}")


def assert_not_optimizer_state(tree: Any, what: str) -> None:
  """Raises if ``tree`` is an optimizer state (e.g. arguments of ``update`` swapped).

  Raises:
    InvalidTreeError: saying which argument received an optimizer state.
  """
  # NamedTuple states (optax's and this package's) carry a `count` field.
  if isinstance(tree, tuple) and hasattr(tree, "_fields") and "count" in tree._fields:
    raise errors.InvalidTreeError(
        f"{what} is an optimizer state ({type(tree).__name__}); the order is "
        "tx.update(grads, opt_state, params)")
