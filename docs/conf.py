"""Sphinx configuration of the optax_learned docs.

Build (offline; warnings are errors)::

  sphinx-build -W --keep-going -b html docs docs/_build/html
  sphinx-build -W --keep-going -b doctest docs docs/_build/doctest

or ``make -C docs html doctest``. Needs only the ``docs`` extra of pyproject.toml.
"""

import datetime
import os
import pathlib
import sys
import warnings

DOCS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = DOCS_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(DOCS_DIR / "_ext"))

# Document on the CPU whatever the machine has; examples are small.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import optax_learned  # noqa: E402

# sphinx-autodoc-typehints calls a Sphinx API deprecated for Sphinx 10 (a Python warning, not
# a Sphinx one: it does not fail -W, it only clutters the log).
warnings.filterwarnings("ignore", message=r".*_RstSnippetParser\.set_application.*")

project = "optax_learned"
author = "The optax_learned authors"
# The year of the build (or of SOURCE_DATE_EPOCH, for reproducible builds).
_BUILD_TIME = datetime.datetime.fromtimestamp(
    int(os.environ.get("SOURCE_DATE_EPOCH", datetime.datetime.now().timestamp())),
    tz=datetime.UTC)
_YEARS = "2025" if _BUILD_TIME.year <= 2025 else f"2025-{_BUILD_TIME.year}"
copyright = f"{_YEARS}, The optax_learned authors"  # noqa: A001
release = optax_learned.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
    # Local extensions (docs/_ext).
    "api_coverage",
    "generated_content",
    "mathml",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_changelog_placeholder.md", "Thumbs.db", ".DS_Store", "README.md"]
templates_path = ["_templates"]
nitpicky = False
smartquotes = False  # keep "--set" and 'quotes' as typed (commands and messages are quoted)
toc_object_entries_show_parents = "hide"  # "to_dict()" rather than "LearnedOptimizer.to_dict()"

# -- offline -------------------------------------------------------------------------------------
# No intersphinx (it downloads inventories) and no MathJax (it loads from a CDN in the browser):
# math is rendered to MathML at build time by docs/_ext/mathml.py.
html_math_renderer = "mathml"

# -- MyST ----------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist", "fieldlist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True
suppress_warnings = []

# -- autodoc / autosummary / napoleon -----------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: no duplicate attribute descriptions
napoleon_use_rtype = False

typehints_fully_qualified = False
always_document_param_types = False
typehints_document_rtype = True
typehints_use_signature = False
typehints_use_signature_return = False
# sphinx-autodoc-typehints: keep "Returns:" text as written.
typehints_use_rtype = False

# -- doctest -------------------------------------------------------------------------------------
# Only the {doctest}/{testcode} blocks of the pages are tested. Bare ">>>" examples in
# docstrings are illustrations (some need a task or a run directory) and are not run.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")
"""

# -- API coverage (docs/_ext/api_coverage.py) ---------------------------------------------------
api_coverage_modules = [
    "optax_learned",
    "metatrain",
    "metatrain.estimators",
    "metatrain.truncation",
    "metatrain.trainer",
    "metatrain.configs",
    "metatrain.evaluation",
    "metatrain.evaluation_report",
    "metatrain.measurement",
    "metatrain.baseline_cache",
    "metatrain.diagnostics",
    "metatrain.data",
    "metatrain.tasks",
    "metatrain.tasks.cifar",
    "metatrain.timing",
    "metatrain.generality.models",
    "metatrain.generality.protocol",
    "metatrain.generality.suite",
]

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"optax_learned {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_last_updated_fmt = None
html_show_sourcelink = True
html_copy_source = True
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "use_issues_button": False,
    "use_edit_page_button": False,
    "use_source_button": False,
    "navigation_with_keys": False,
    "show_navbar_depth": 1,
}


def _skip_namedtuple_field_aliases(app, what, name, obj, skip, options):
  """NamedTuple fields are described in the class's "Attributes:" section already."""
  doc = getattr(obj, "__doc__", None) or ""
  if what == "class" and doc.startswith("Alias for field number"):
    return True
  return None


# Module-level data whose value is a plain dict, tuple or alias would otherwise show the
# docstring of its type (``dict``'s, ``tuple``'s); these are shown instead.
DATA_DOCSTRINGS = {
    "optax_learned.MetaParams": (
        "The learned optimizer's weights (its meta-parameters): a dict of float32 arrays, as "
        ":meth:`LearnedOptimizer.init` returns them and :func:`load_weights` loads them."),
    "metatrain.configs.CONFIGS": (
        "The named recipes: name to ``(RunConfig, one-line description)``. "
        "``metatrain list`` prints them and ``--config NAME`` starts from one."),
    "metatrain.estimators.ESTIMATORS": (
        "The estimator names, the values of ``EstimatorConfig.estimator`` and of the "
        "``estimator`` key of a run config."),
    "metatrain.configs.RUN_CONTROL_KEYS": (
        "Keys that steer a run without changing what it computes: a run may be resumed with "
        "other values of these keys."),
    "metatrain.tasks.cifar.ACTIVATIONS": (
        "The activations of the CIFAR-10 tasks: name to function, the values of their "
        "``activation`` field."),
    "metatrain.tasks.cifar.RESOLUTIONS": (
        "The image sides (pixels) a CIFAR-10 task may train at, the values of its "
        "``resolution`` field."),
    "metatrain.tasks.cifar.VALIDATE_ON": (
        "The values of a CIFAR-10 task's ``validate_on`` field: the rows its ``\"valid\"`` "
        "split is drawn from."),
    "metatrain.generality.models.SUITE": (
        "The models of the generality suite: name to "
        ":class:`~metatrain.generality.models.SuiteModel`."),
    "metatrain.generality.protocol.HOLDOUT_ROWS": (
        "The last rows of the CIFAR-10 training split that the suite validates on; the "
        "``cifar`` recipe holds them out of meta-training."),
}

# Module-level data re-exported from the module that defines it: autodoc reads attribute
# docstrings (a string literal after the assignment) from the module it documents, so the
# re-export would show no description. Its docstring is read from the defining module.
DATA_DEFINED_IN = {
    "optax_learned.FORMAT_VERSION": "optax_learned._src.checkpoint",
}


def _attribute_docstring(name: str) -> list[str] | None:
  """The docstring following ``NAME = ...`` in the module that defines ``name``."""
  from sphinx.pycode import ModuleAnalyzer  # pylint: disable=import-outside-toplevel

  module = DATA_DEFINED_IN.get(name)
  if module is None:
    return None
  docs = ModuleAnalyzer.for_module(module).find_attr_docs()
  lines = docs.get(("", name.rpartition(".")[2]))
  if not lines:
    raise RuntimeError(f"{module} has no docstring for {name.rpartition('.')[2]}")
  return list(lines)


def _data_docstring(app, what, name, obj, options, lines):
  """Replaces a builtin type's docstring on module-level data by DATA_DOCSTRINGS[name]."""
  if what not in ("data", "attribute"):
    return
  defined = _attribute_docstring(name)
  if defined is not None:
    lines[:] = defined
    return
  type_doc = (type(obj).__doc__ or "").strip().splitlines()
  own = [line for line in lines if line.strip()]
  if name in DATA_DOCSTRINGS or (type_doc and own and own[0].strip() == type_doc[0].strip()):
    lines[:] = DATA_DOCSTRINGS.get(name, "").split("\n") + [""]


def _drop_object_base(app, name, obj, options, bases):
  """No "Bases: object" line on classes that derive from nothing else."""
  bases[:] = [base for base in bases if base is not object]


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_field_aliases)
  app.connect("autodoc-process-bases", _drop_object_base)
  app.connect("autodoc-process-docstring", _data_docstring)
