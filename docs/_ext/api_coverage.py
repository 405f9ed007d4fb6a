"""Fails the docs build when a public name is missing from the API reference.

The public API is, for each module named in the ``api_coverage_modules`` config value:

* the names in the module's ``__all__``, if it has one;
* otherwise the public (no leading underscore) functions and classes defined in the module
  itself (their ``__module__`` is the module), not those it imports.

A name counts as documented when the Python domain holds an object description for it under
the module's path (``metatrain.tasks.ConvNetTask``) or under the path where it is defined
(``metatrain.tasks.convnet.ConvNetTask``), which is what ``autosummary``/``autodoc`` entries
produce; a re-exported class, function or module (``metatrain.get_task``) also counts when the
same object is documented under any other path (``metatrain.tasks.get_task``).

The check runs on ``env-check-consistency``, i.e. after every document has been read, for
every builder (html, doctest, ...). Each undocumented name is logged as a warning, and the
build's exit status is 1 with or without ``-W``.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Collection, Iterable

from sphinx.util import logging

logger = logging.getLogger(__name__)


def public_names(module: types.ModuleType) -> list[str]:
  """The public names of ``module``: its ``__all__``, else what it defines at top level."""
  if hasattr(module, "__all__"):
    return list(module.__all__)
  names = []
  for name, obj in vars(module).items():
    if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
      continue
    if getattr(inspect.unwrap(obj), "__module__", None) == module.__name__:
      names.append(name)
  return sorted(names)


def _candidate_paths(module: types.ModuleType, name: str) -> set[str]:
  """The dotted paths under which documenting ``module.name`` counts."""
  paths = {f"{module.__name__}.{name}"}
  obj = getattr(module, name, None)
  if isinstance(obj, types.ModuleType):
    paths.add(obj.__name__)
  elif inspect.isclass(obj) or inspect.isroutine(obj):
    obj = inspect.unwrap(obj)
    if getattr(obj, "__module__", None) and getattr(obj, "__qualname__", None):
      paths.add(f"{obj.__module__}.{obj.__qualname__}")
  return paths


def _identifiable(obj) -> bool:
  """Whether identity says which documented entry ``obj`` is (not so for ints, strings...)."""
  return inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, types.ModuleType)


def resolve_path(path: str):
  """The object at a dotted path (longest importable module prefix, then attributes).

  Returns:
    The object, or ``None`` if the path does not resolve.
  """
  parts = path.split(".")
  for split in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:split]))
    except ImportError:
      continue
    try:
      for attribute in parts[split:]:
        obj = getattr(obj, attribute)
    except AttributeError:
      return None
    return obj
  return None


def documented_ids(documented: Collection[str]) -> set[int]:
  """``id``s of the classes, functions and modules at the ``documented`` paths."""
  ids = set()
  for path in documented:
    obj = resolve_path(path)
    if obj is not None and _identifiable(obj):
      ids.add(id(inspect.unwrap(obj) if inspect.isroutine(obj) else obj))
  return ids


def undocumented(module: types.ModuleType, documented: Collection[str],
                 object_ids: Collection[int] | None = None) -> list[str]:
  """Public names of ``module`` (as ``module.name``) with no entry in ``documented``.

  Args:
    module: the module whose public API is checked.
    documented: dotted paths of documented objects (e.g. the Python domain's objects).
    object_ids: ``documented_ids(documented)``, computed if not given.

  Returns:
    Sorted ``module.name`` strings; names listed in ``__all__`` that the module does not
    define are reported too, with `` (listed in __all__ but not defined)`` appended.
  """
  documented = set(documented)
  object_ids = documented_ids(documented) if object_ids is None else object_ids
  missing = []
  for name in public_names(module):
    if not hasattr(module, name):
      missing.append(f"{module.__name__}.{name} (listed in __all__ but not defined)")
      continue
    if _candidate_paths(module, name) & documented:
      continue
    obj = getattr(module, name)
    if _identifiable(obj):
      key = inspect.unwrap(obj) if inspect.isroutine(obj) else obj
      if id(key) in object_ids:
        continue
    missing.append(f"{module.__name__}.{name}")
  return sorted(missing)


def find_undocumented(module_names: Iterable[str], documented: Collection[str]) -> list[str]:
  """``undocumented`` over several modules, imported by name."""
  object_ids = documented_ids(documented)
  missing = []
  for module_name in module_names:
    missing.extend(undocumented(importlib.import_module(module_name), documented, object_ids))
  return missing


def documented_paths(env) -> set[str]:
  """Dotted paths of every object and module the Python domain describes."""
  domain = env.get_domain("py")
  return set(domain.objects) | set(domain.modules)


def _check(app, env) -> None:
  missing = find_undocumented(app.config.api_coverage_modules, documented_paths(env))
  if not missing:
    return
  for name in missing:
    logger.warning("public name not documented in the API reference (add it to an "
                   "autosummary list under docs/api/): %s", name, type="api_coverage")
  app.statuscode = 1  # fail even without -W


def setup(app):
  app.add_config_value("api_coverage_modules", [], "env", types=(list, tuple))
  app.connect("env-check-consistency", _check)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
