"""Parts of pages that are generated from the code at build time.

A page asks for generated Markdown with a MyST comment line of its own::

  % generated: cli-reference

The ``source-read`` handler replaces that line with the Markdown of the named generator before
the page is parsed, and records what the text depends on, so an incremental build redoes
the page when the code or data changes. A marker naming no generator stops the build.

Generators:

* ``cli-reference``: every ``metatrain`` subcommand and option, from
  ``metatrain.cli.build_parser()``.
* ``bad-inputs``: the tables of ``docs/bad_inputs.toml`` (checked against the code by
  ``tests/test_docs.py``), with the exception hierarchy of ``optax_learned``.
* ``bundled-optimizers``: ``optax_learned.available()`` with each checkpoint's metadata, and
  an include of each ``checkpoints/<name>/MODEL_CARD.md`` that exists.
* ``quickstart-figure``: ``_static/quickstart.png`` as a figure, if that file exists.
* ``changelog``: an include of the repository's ``CHANGELOG.md``, or, while it does not exist,
  of the placeholder ``docs/_changelog_placeholder.md``.
* ``tasks``: the registered tasks, task families (with their fields) and named configs.
* ``metatrain-exports``: the names ``metatrain`` re-exports, linked to their module's docs.
* ``benchmark-scripts``: a section per ``benchmarks/*.py`` (not ``__init__.py``) with its
  module docstring.
* ``benchmark-results``: an include of ``benchmarks/RESULTS.md`` if it exists.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pathlib
import re
import tomllib
from collections.abc import Callable

from sphinx.errors import SphinxError

DOCS_DIR = pathlib.Path(__file__).resolve().parents[1]
REPO_ROOT = DOCS_DIR.parent
BAD_INPUTS_FILE = DOCS_DIR / "bad_inputs.toml"
MARKER = re.compile(r"^% generated: ([a-z-]+)[ \t]*$", re.MULTILINE)
USAGE_WIDTH = 88


class GeneratedContentError(SphinxError):
  category = "Generated docs content"


# -- Markdown helpers ---------------------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\*_\[\]<>|$#])")


def escape_markdown(text: str, *, in_table: bool = False) -> str:
  """Escapes Markdown syntax in ``text``, keeping its backtick code spans as code.

  ``$`` is escaped too (pages use MyST's ``dollarmath``). In a table cell ``|`` is escaped
  inside code spans as well, as GFM tables require.
  """
  parts = re.split(r"(`[^`]*`)", text)
  out = []
  for part in parts:
    if part.startswith("`") and part.endswith("`") and len(part) > 1:
      out.append(part.replace("|", r"\|") if in_table else part)
    else:
      out.append(_MARKDOWN_SPECIAL.sub(r"\\\1", part))
  return "".join(out)


def code(text: str, *, in_table: bool = False) -> str:
  """``text`` as an inline code span (with enough backticks to hold its own)."""
  fence = "``" if "`" in text else "`"
  pad = " " if text.startswith("`") or text.endswith("`") else ""
  span = f"{fence}{pad}{text}{pad}{fence}"
  return span.replace("|", r"\|") if in_table else span


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
  lines += ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows]
  return "\n".join(lines)


# -- CLI reference ------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:  # pylint: disable=protected-access
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      return action
  return None


def _fixed_width(parser: argparse.ArgumentParser) -> None:
  """Makes ``parser`` format usage at a fixed width, whatever the terminal."""
  parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=USAGE_WIDTH)


def _option_cell(action: argparse.Action) -> str:
  if not action.option_strings:
    return code(action.metavar or action.dest, in_table=True)
  names = ", ".join(action.option_strings)
  if action.nargs != 0:
    metavar = action.metavar
    if metavar is None:
      metavar = ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                 else action.dest.upper())
    names += f" {metavar}"
  return code(names, in_table=True)


def _help_cell(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
  help_text = action.help or ""
  if "%(" in help_text:
    help_text = parser._get_formatter()._expand_help(action)  # pylint: disable=protected-access
  text = escape_markdown(help_text, in_table=True)
  notes = []
  if action.required:
    notes.append("Required.")
  if action.choices and not isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
    notes.append("One of " + ", ".join(code(str(c), in_table=True) for c in action.choices)
                 + ".")
  if isinstance(action, argparse._AppendAction):  # pylint: disable=protected-access
    notes.append("Repeatable.")
  default = action.default
  if (action.nargs != 0 and default not in (None, [], argparse.SUPPRESS)
      and "default" not in help_text.lower()):
    notes.append(f"Default: {code(str(default), in_table=True)}.")
  if text and not text.rstrip().endswith("."):
    text = text.rstrip() + "."
  return " ".join([text] + notes).strip()


def cli_reference_markdown(parser: argparse.ArgumentParser) -> str:
  """Markdown reference of ``parser`` and each of its subcommands.

  For the top-level parser and every subcommand: a heading with an explicit target
  (``cli-<command>``), the description, the usage line and a table of every option and
  positional argument (``--help`` excepted) with its help, choices, default and whether it is
  required or repeatable.
  """
  _fixed_width(parser)
  subparsers = _subparsers(parser)
  lines = [f"({parser.prog}-cli)=", f"## `{parser.prog}`", "",
           escape_markdown(parser.description or ""), "", "```text",
           parser.format_usage().strip(), "```", ""]
  if subparsers is not None:
    rows = [[f"[{code(f'{parser.prog} {choice.dest}', in_table=True)}](#cli-{choice.dest})",
             escape_markdown(choice.help or "", in_table=True)]
            for choice in subparsers._choices_actions]  # pylint: disable=protected-access
    lines += [_table(["Command", "What it does"], rows), ""]
    for name, subparser in subparsers.choices.items():
      _fixed_width(subparser)
      lines += [f"(cli-{name})=", f"## `{subparser.prog}`", "",
                escape_markdown(subparser.description or ""), "", "```text",
                subparser.format_usage().strip(), "```", ""]
      rows = [[_option_cell(action), _help_cell(subparser, action)]
              for action in subparser._actions  # pylint: disable=protected-access
              if not isinstance(action, argparse._HelpAction)]  # pylint: disable=protected-access
      lines += [_table(["Option", "Description"], rows) if rows else "No options.", ""]
  return "\n".join(lines)


# -- bad inputs ---------------------------------------------------------------------------------


def load_bad_inputs(path: pathlib.Path = BAD_INPUTS_FILE) -> dict:
  """The sections and cases of ``bad_inputs.toml``, validated.

  Raises:
    ValueError: a case in an unknown section, a duplicate id, a case with both ``raises`` and
      ``exit_status``, or one without any of ``raises``, ``exit_status`` and ``outcome``.
  """
  data = tomllib.loads(path.read_text(encoding="utf-8"))
  sections = {section["id"]: section for section in data.get("section", [])}
  seen = set()
  for case in data.get("case", []):
    where = f"{path.name}: case {case.get('id')!r}"
    if case.get("id") in seen:
      raise ValueError(f"{where}: duplicate id")
    seen.add(case["id"])
    if case.get("section") not in sections:
      raise ValueError(f"{where}: unknown section {case.get('section')!r}")
    kinds = [key for key in ("raises", "exit_status", "outcome") if key in case]
    if not kinds or ("raises" in case and "exit_status" in case):
      raise ValueError(f"{where}: needs one of raises, exit_status or outcome, got {kinds}")
    if ("raises" in case or "exit_status" in case) and not case.get("gist"):
      raise ValueError(f"{where}: an error row needs a gist")
  return {"sections": list(sections.values()), "cases": data.get("case", [])}


def resolve(dotted: str):
  """The object at a dotted path such as ``optax_learned.CheckpointError``."""
  module_name, _, name = dotted.rpartition(".")
  return getattr(importlib.import_module(module_name), name)


def _exception_name(dotted: str) -> str:
  module, _, name = dotted.rpartition(".")
  return name if module in ("builtins", "optax_learned") else dotted


def _builtin_bases(cls: type) -> list[str]:
  """Built-in exception classes ``cls`` derives from (other than itself and Exception)."""
  return [base.__name__ for base in cls.__mro__[1:]
          if base.__module__ == "builtins" and base not in (Exception, BaseException, object)]


def _what_you_get(case: dict) -> str:
  if "raises" in case:
    cls = resolve(case["raises"])
    text = code(_exception_name(case["raises"]), in_table=True)
    bases = _builtin_bases(cls) if cls.__module__ != "builtins" else []
    if bases:
      text += " (a " + " and a ".join(code(b, in_table=True) for b in bases) + ")"
    return text
  if "exit_status" in case:
    return f"exit status {case['exit_status']}, message on stderr"
  return case["outcome"]


def _gist(case: dict) -> str:
  if "gist" not in case or not case["gist"]:
    return ""
  return " … ".join(code(fragment, in_table=True) for fragment in case["gist"])


def _hierarchy_markdown(root: type, classes: list[type], depth: int = 0) -> list[str]:
  lines = []
  children = [c for c in classes if root in c.__bases__]
  for child in children:
    bases = [b.__name__ for b in child.__bases__ if b.__module__ == "builtins"]
    also = f" (also a {', '.join(code(b) for b in bases)})" if bases else ""
    lines.append("  " * depth + f"- {{class}}`~optax_learned.{child.__name__}`{also}: "
                 + escape_markdown((inspect.getdoc(child) or "").splitlines()[0]))
    lines += _hierarchy_markdown(child, classes, depth + 1)
  return lines


def bad_inputs_markdown(data: dict | None = None) -> str:
  """The exception hierarchy, then one table per section of ``bad_inputs.toml``."""
  data = load_bad_inputs() if data is None else data
  package = importlib.import_module("optax_learned")
  errors = [getattr(package, name) for name in package.__all__
            if inspect.isclass(getattr(package, name))
            and issubclass(getattr(package, name), Exception)]
  root = package.LearnedOptimizerError
  lines = ["## The exceptions of `optax_learned`", "",
           f"- {{class}}`~optax_learned.{root.__name__}`: "
           + escape_markdown(inspect.getdoc(root).splitlines()[0])]
  lines += ["  " + line for line in _hierarchy_markdown(root, errors)]
  lines.append("")
  for section in data["sections"]:
    cases = [case for case in data["cases"] if case["section"] == section["id"]]
    if not cases:
      continue
    lines += [f"(bad-inputs-{section['id']})=", f"## {section['title']}", "",
              section.get("intro", ""), ""]
    rows = []
    for case in cases:
      what = _what_you_get(case)
      if "checked_by" in case:
        what += f" <br>(checked by {code(case['checked_by'], in_table=True)})"
      rows.append([case["input"].replace("|", r"\|"), what, _gist(case)])
    lines += [_table(["Bad input", "What you get", "The message says"], rows), ""]
  return "\n".join(lines)


# -- bundled optimizers ---------------------------------------------------------------------------


def _bundled_root() -> pathlib.Path:
  from optax_learned._src import checkpoint  # pylint: disable=import-outside-toplevel
  return checkpoint.bundled_root()


def bundled_markdown(dependencies: list[pathlib.Path] | None = None) -> str:
  """A table of the bundled optimizers and an include of each model card that exists.

  Args:
    dependencies: if given, gets every file the text was made from.
  """
  import optax_learned  # pylint: disable=import-outside-toplevel

  root = _bundled_root()
  deps = dependencies if dependencies is not None else []
  deps.append(root)
  names = optax_learned.available()
  if not names:
    return ("No learned optimizer ships with this version yet: "
            "`optax_learned.available()` returns `{}`.\n")
  rows, cards = [], []
  for name, description in names.items():
    deps.append(root / name / "optimizer.json")
    metadata = optax_learned.load_metadata(name)
    training = importlib.import_module("metatrain.configs").nest_legacy_keys(
        metadata.get("training_config") or {})
    estimator_section = training.get("estimator") or {}
    truncation_section = training.get("truncation") or {}
    summary = metadata.get("summary") or {}
    lopt_config = json.loads((root / name / "optimizer.json").read_text())["optimizer"]
    trained_on = training.get("task_family") or training.get("task") or "?"
    estimator = estimator_section.get("name", "?")
    if estimator == "merged":
      estimator += f" ({estimator_section.get('merged_es', '?')})"
    horizons = (f"{truncation_section['min_horizon']}–{truncation_section['max_horizon']}"
                if {"min_horizon", "max_horizon"} <= set(truncation_section) else "?")
    card = root / name / "MODEL_CARD.md"
    hidden_sizes = code(str(tuple(lopt_config.get("hidden_sizes", ()))), in_table=True)
    meta_steps = f"{summary.get('meta_steps', '?')} meta-steps"
    parent = metadata.get("fine_tuned_from") or {}
    if parent:  # the summary counts the fine-tune's meta-steps only
      meta_steps = (f"{parent.get('meta_steps', '?')} meta-steps, then a fine-tune of "
                    f"{meta_steps}")
    recipe = (f"{code(trained_on, in_table=True)} with {code(estimator, in_table=True)}, "
              f"{meta_steps}, inner horizons {horizons}; MLP hidden sizes {hidden_sizes}")
    rows.append([code(name, in_table=True), escape_markdown(description, in_table=True), recipe,
                 f"[{name}](#model-card-{name})" if card.is_file() else "none yet"])
    deps.append(card)
    if card.is_file():
      cards.append((name, card))
  lines = ["Generated at build time from `optax_learned.available()` and each checkpoint's "
           "metadata.", "",
           _table(["Name", "Description", "Meta-training", "Model card"], rows), ""]
  for name, card in cards:
    relative = pathlib.Path("..") / card.relative_to(REPO_ROOT)
    lines += [f"(model-card-{name})=", f"## Model card: `{name}`", "",
              f"```{{include}} {relative.as_posix()}", ":relative-images:",
              ":heading-offset: 2", "```", ""]
  return "\n".join(lines)


# -- quickstart figure and changelog -----------------------------------------------------------


def quickstart_figure_markdown(dependencies: list[pathlib.Path] | None = None) -> str:
  figure = DOCS_DIR / "_static" / "quickstart.png"
  if dependencies is not None:
    dependencies.append(figure)
  if not figure.is_file():
    return ("```{note}\nThe figure `quickstart.png` of this run is not in the docs yet; "
            "run the script to draw it.\n```\n")
  return ("```{figure} _static/quickstart.png\n:alt: Training and validation loss of the "
          "learned optimizer and of Adam at three learning rates on the digits MLP\n"
          ":width: 100%\n\n`quickstart.png` as written by `python examples/quickstart.py`: "
          "training loss (left) and validation loss (right) against steps, mean over seeds.\n"
          "```\n")


def changelog_markdown(dependencies: list[pathlib.Path] | None = None) -> str:
  changelog = REPO_ROOT / "CHANGELOG.md"
  if dependencies is not None:
    dependencies.append(changelog)
  target = "../CHANGELOG.md" if changelog.is_file() else "_changelog_placeholder.md"
  return f"```{{include}} {target}\n:relative-images:\n```\n"


# -- tasks, families and named configs -----------------------------------------------------------


def _field_default(field) -> str:
  import dataclasses  # pylint: disable=import-outside-toplevel
  if field.default is not dataclasses.MISSING:
    return repr(field.default)
  if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
    return repr(field.default_factory())  # type: ignore[misc]
  return "required"


def tasks_markdown(dependencies: list[pathlib.Path] | None = None) -> str:
  """Tables of the registered tasks, the task families (with their fields) and the configs."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  families = importlib.import_module("metatrain.tasks.families")
  configs = importlib.import_module("metatrain.configs")
  if dependencies is not None:
    dependencies += [pathlib.Path(families.__file__), pathlib.Path(configs.__file__)]
  task_rows = []
  for name, description in families.task_names().items():
    task = families.get_task(name)
    task_rows.append([code(name, in_table=True), escape_markdown(description, in_table=True),
                      f"{{class}}`~metatrain.tasks.{type(task).__name__}`"])
  family_rows = []
  for name in families.family_names():
    family = families.get_family(name)
    fields = ", ".join(code(f"{f.name}={_field_default(f)}", in_table=True)
                       for f in dataclasses.fields(family))
    family_rows.append([code(name, in_table=True),
                        f"{{class}}`~metatrain.tasks.{type(family).__name__}`", fields])
  config_rows = []
  for name, (config, description) in configs.CONFIGS.items():
    trained_on = (f"{config.num_task_variants} variants of the family "
                  f"{code(config.task_family, in_table=True)}" if config.task_family
                  else f"the task {code(config.task, in_table=True)}")
    est, trunc = config.estimator, config.truncation
    estimator = est.name + (f" ({est.merged_es})" if est.name == "merged" else "")
    settings = (f"{code(estimator, in_table=True)}, {est.num_tasks} tasks × "
                f"{est.num_pairs} pairs, σ = {est.sigma}, truncations of "
                f"{trunc.length}, horizons {trunc.min_horizon}–"
                f"{trunc.max_horizon}, {config.steps} meta-steps")
    config_rows.append([code(name, in_table=True), trained_on, settings,
                        escape_markdown(description, in_table=True)])
  return "\n".join([
      "(registered-tasks)=", "### Registered tasks", "",
      _table(["Name", "Description", "Class"], task_rows), "",
      "(task-families)=", "### Task families", "",
      _table(["Name", "Class", "Fields (defaults)"], family_rows), "",
      "(named-configs)=", "### Named configs", "",
      _table(["Config", "Meta-trains on", "Settings", "Description (`metatrain list`)"],
             config_rows), ""])


def benchmark_scripts_markdown(dependencies: list[pathlib.Path] | None = None) -> str:
  """A section per ``benchmarks/*.py``: its module docstring (reST), which documents it."""
  import ast  # pylint: disable=import-outside-toplevel

  lines = []
  for script in sorted((REPO_ROOT / "benchmarks").glob("*.py")):
    if script.name.startswith("_"):  # __init__.py: the package, not a script
      continue
    if dependencies is not None:
      dependencies.append(script)
    docstring = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")))
    if not docstring:
      raise GeneratedContentError(f"{script}: a benchmark script needs a module docstring")
    lines += [f"(benchmark-{script.stem})=", f"## `{script.name}`", "", "```{eval-rst}",
              docstring, "```", ""]
  return "\n".join(lines)


def benchmark_results_markdown(dependencies: list[pathlib.Path] | None = None) -> str:
  """``benchmarks/RESULTS.md`` if it exists, else a sentence saying there is none yet."""
  results = REPO_ROOT / "benchmarks" / "RESULTS.md"
  if dependencies is not None:
    dependencies.append(results)
  if not results.is_file():
    return ("No benchmark results are recorded in the repository yet "
            "(`benchmarks/RESULTS.md` does not exist), so this page quotes none.\n")
  return "```{include} ../benchmarks/RESULTS.md\n:relative-images:\n:heading-offset: 1\n```\n"


def package_exports_markdown(package_name: str, module_names: list[str],
                             dependencies: list[pathlib.Path] | None = None) -> str:
  """A list of ``package.__all__``, each linked to the module among ``module_names`` that
  also exports it (the same object), where the API reference documents it."""
  package = importlib.import_module(package_name)
  if dependencies is not None:
    dependencies.append(pathlib.Path(package.__file__))
  modules = [importlib.import_module(name) for name in module_names]
  items = []
  for name in getattr(package, "__all__", ()):
    obj = getattr(package, name)
    home = next((m.__name__ for m in modules
                 if name in getattr(m, "__all__", vars(m)) and getattr(m, name, None) is obj),
                None)
    target = f"{home}.{name}" if home else f"{package_name}.{name}"
    items.append(f"- {{py:obj}}`{name} <{target}>`" + (f" (from `{home}`)" if home else ""))
  if not items:
    return f"`{package_name}` re-exports nothing: import its modules.\n"
  return "\n".join(items) + "\n"


def _metatrain_exports(dependencies: list[pathlib.Path]) -> str:
  return package_exports_markdown(
      "metatrain", ["metatrain.configs", "metatrain.trainer", "metatrain.estimators",
                    "metatrain.truncation", "metatrain.tasks", "metatrain.data",
                    "metatrain.evaluation", "metatrain.diagnostics"], dependencies)


def _cli_reference(dependencies: list[pathlib.Path]) -> str:
  cli = importlib.import_module("metatrain.cli")
  dependencies.append(pathlib.Path(cli.__file__))
  return cli_reference_markdown(cli.build_parser())


def _bad_inputs(dependencies: list[pathlib.Path]) -> str:
  dependencies.append(BAD_INPUTS_FILE)
  return bad_inputs_markdown()


GENERATORS: dict[str, Callable[[list[pathlib.Path]], str]] = {
    "cli-reference": _cli_reference,
    "bad-inputs": _bad_inputs,
    "bundled-optimizers": bundled_markdown,
    "quickstart-figure": quickstart_figure_markdown,
    "changelog": changelog_markdown,
    "tasks": tasks_markdown,
    "benchmark-results": benchmark_results_markdown,
    "benchmark-scripts": benchmark_scripts_markdown,
    "metatrain-exports": _metatrain_exports,
}


def expand_markers(text: str, dependencies: list[pathlib.Path]) -> str:
  """``text`` with each ``% generated: NAME`` line replaced by its generator's Markdown."""
  def replace(match: re.Match) -> str:
    name = match.group(1)
    if name not in GENERATORS:
      raise GeneratedContentError(f"unknown generated content {name!r}; known: "
                                  f"{sorted(GENERATORS)}")
    return GENERATORS[name](dependencies)
  return MARKER.sub(replace, text)


def _source_read(app, docname: str, source: list[str]) -> None:
  if "% generated:" not in source[0]:
    return
  dependencies: list[pathlib.Path] = []
  source[0] = expand_markers(source[0], dependencies)
  for path in dependencies:
    app.env.note_dependency(str(path))


def setup(app):
  app.connect("source-read", _source_read)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
