"""The docs: they build offline with warnings as errors, their examples pass, and the facts
they state that come from the code (the bad-input table, the CLI reference, the API
coverage check, bundled names) agree with the code."""

import ast
import contextlib
import importlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import sphinx  # noqa: F401  (the docs extra is installed wherever the tests run)

import optax_learned

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import api_coverage  # noqa: E402
import generated_content  # noqa: E402

# -- the builds ---------------------------------------------------------------------------------


def _sphinx(builder: str, out: pathlib.Path, doctrees: pathlib.Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
  return subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
       "-d", str(doctrees), str(DOCS), str(out)],
      env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def _external_resources(html_dir: pathlib.Path) -> list[str]:
  """Scripts, stylesheets, images, fonts and frames the pages would fetch from elsewhere."""
  fetched = re.compile(
      r"<(?:script|img|iframe|source)\b[^>]*\bsrc=\"((?:https?:)?//[^\"]+)\"|"
      r"<link\b[^>]*\bhref=\"((?:https?:)?//[^\"]+)\"|url\(['\"]?((?:https?:)?//[^)'\"]+)")
  found = []
  for path in list(html_dir.rglob("*.html")) + list(html_dir.rglob("*.css")):
    for match in fetched.finditer(path.read_text(encoding="utf-8", errors="replace")):
      found.append(f"{path.relative_to(html_dir)}: {next(g for g in match.groups() if g)}")
  return found


@pytest.mark.slow
def test_docs_build_offline_with_warnings_as_errors_and_examples_pass(tmp_path):
  """`sphinx-build -W -b html` then `-b doctest` (sharing the doctree cache) both pass."""
  doctrees = tmp_path / "doctrees"
  html = _sphinx("html", tmp_path / "html", doctrees)
  assert html.returncode == 0, html.stdout[-5000:] + html.stderr[-10000:]
  html_dir = tmp_path / "html"
  for page in ("index", "installation", "quickstart", "usage", "bundled", "checkpoints",
               "metatraining", "cli", "bad_inputs", "benchmarks", "changelog", "api/index",
               "api/optax_learned", "api/metatrain"):
    assert (html_dir / f"{page}.html").is_file(), page
  assert not _external_resources(html_dir), _external_resources(html_dir)
  # Math is MathML, rendered at build time (no MathJax).
  assert "<math" in (html_dir / "metatraining.html").read_text(encoding="utf-8")
  # Every image a page shows was copied into the site.
  for page in html_dir.rglob("*.html"):
    for src in re.findall(r"<img\b[^>]*\bsrc=\"([^\"]+)\"", page.read_text(encoding="utf-8")):
      if not src.startswith(("data:", "http:", "https:")):
        assert (page.parent / src).is_file(), (page, src)

  doctest = _sphinx("doctest", tmp_path / "doctest", doctrees)
  output = (tmp_path / "doctest" / "output.txt")
  report = output.read_text() if output.is_file() else ""
  assert doctest.returncode == 0, report[-5000:] + doctest.stderr[-5000:]
  assert re.search(r"\b0 failures in tests", report), report[-3000:]
  ran = int(re.search(r"(\d+) tests", report.split("Doctest summary")[-1]).group(1))
  assert ran >= 50, report[-3000:]


# -- the API coverage check ---------------------------------------------------------------------


def _fake_module(name: str, source: str, with_all: list[str] | None) -> types.ModuleType:
  module = types.ModuleType(name)
  exec(compile(source, f"<{name}>", "exec"), module.__dict__)  # pylint: disable=exec-used
  if with_all is not None:
    module.__all__ = with_all
  return module


def test_coverage_check_reports_an_undocumented_name_of_all():
  module = _fake_module("fake_api", "def documented(): pass\ndef forgotten(): pass\n",
                        ["documented", "forgotten"])
  assert api_coverage.undocumented(module, {"fake_api.documented"}) == ["fake_api.forgotten"]
  assert api_coverage.undocumented(module, {"fake_api.documented", "fake_api.forgotten"}) == []


def test_coverage_check_without_all_uses_public_functions_and_classes_defined_there():
  module = _fake_module(
      "fake_mod", "import json\nfrom os import path\nCONSTANT = 3\n"
      "def public(): pass\ndef _private(): pass\nclass Thing: pass\n", None)
  module.imported = json.dumps  # defined elsewhere: not this module's API
  assert api_coverage.public_names(module) == ["Thing", "public"]
  assert api_coverage.undocumented(module, set()) == ["fake_mod.Thing", "fake_mod.public"]
  assert api_coverage.undocumented(module, {"fake_mod.Thing", "fake_mod.public"}) == []


def test_coverage_check_reports_names_of_all_that_do_not_exist():
  module = _fake_module("fake_all", "def f(): pass\n", ["f", "gone"])
  assert api_coverage.undocumented(module, {"fake_all.f"}) == [
      "fake_all.gone (listed in __all__ but not defined)"]


def test_coverage_check_accepts_a_reexport_documented_elsewhere():
  """metatrain.get_task is the same function as the documented metatrain.tasks.get_task."""
  import metatrain  # pylint: disable=import-outside-toplevel

  documented = {"metatrain.tasks.get_task"}
  missing = api_coverage.undocumented(metatrain, documented)
  assert "metatrain.get_task" not in missing
  assert "metatrain.MetaTrainer" in missing


def test_coverage_check_covers_the_real_packages():
  """The configured modules are the ones the docs promise to cover, and all import."""
  conf = (DOCS / "conf.py").read_text()
  for name in ("optax_learned", "metatrain", "metatrain.estimators", "metatrain.truncation",
               "metatrain.trainer", "metatrain.configs", "metatrain.evaluation",
               "metatrain.diagnostics", "metatrain.data", "metatrain.tasks",
               "metatrain.tasks.cifar", "metatrain.timing", "metatrain.generality.models",
               "metatrain.generality.protocol", "metatrain.generality.suite"):
    assert f'"{name}"' in conf, name
    assert api_coverage.public_names(importlib.import_module(name)) or name == "metatrain"
  assert api_coverage.undocumented(optax_learned, set()) == sorted(
      f"optax_learned.{name}" for name in optax_learned.__all__)


# -- the CLI reference --------------------------------------------------------------------------


def test_cli_reference_lists_every_command_and_option():
  from metatrain import cli  # pylint: disable=import-outside-toplevel

  text = generated_content.cli_reference_markdown(cli.build_parser())
  parser = cli.build_parser()
  commands = generated_content._subparsers(parser).choices  # pylint: disable=protected-access
  assert set(commands) == {"train", "export", "evaluate", "diagnose", "list"}
  for name, subparser in commands.items():
    assert f"## `metatrain {name}`" in text
    for action in subparser._actions:  # pylint: disable=protected-access
      for option in action.option_strings:
        if option not in ("-h", "--help"):
          assert f"`{option}" in text, (name, option)


def test_markdown_escaping_keeps_code_spans():
  assert generated_content.escape_markdown("a `x|y` b|c $HOME *") == r"a `x|y` b\|c \$HOME \*"
  assert generated_content.escape_markdown("`x|y`", in_table=True) == r"`x\|y`"


# -- names and files the pages mention ------------------------------------------------------------


def test_bundled_names_used_in_the_pages_exist():
  names = set()
  for page in DOCS.rglob("*.md"):
    if "_build" not in page.parts:
      names.update(re.findall(r"optax_learned\.load(?:_weights|_metadata)?\(\"([\w.-]+)\"\)",
                              page.read_text()))
  names.discard("nope")  # the bad-input examples
  assert names, "the pages should show loading a bundled optimizer"
  assert names <= set(optax_learned.available()), (names, optax_learned.available())


def test_optional_content_has_placeholders(tmp_path, monkeypatch):
  """Pages stay buildable and true while CHANGELOG.md, the quickstart figure, bundled
  optimizers or benchmark results are absent, and show them once present."""
  monkeypatch.setattr(generated_content, "REPO_ROOT", tmp_path)
  monkeypatch.setattr(generated_content, "DOCS_DIR", tmp_path / "docs")
  assert "_changelog_placeholder.md" in generated_content.changelog_markdown()
  assert (DOCS / "_changelog_placeholder.md").is_file()
  assert "{note}" in generated_content.quickstart_figure_markdown()
  assert "No benchmark results" in generated_content.benchmark_results_markdown()
  (tmp_path / "CHANGELOG.md").write_text("# Changelog\n")
  (tmp_path / "docs" / "_static").mkdir(parents=True)
  (tmp_path / "docs" / "_static" / "quickstart.png").write_bytes(b"png")
  (tmp_path / "benchmarks").mkdir()
  (tmp_path / "benchmarks" / "RESULTS.md").write_text("# Results\n")
  assert "{include} ../CHANGELOG.md" in generated_content.changelog_markdown()
  assert "{figure} _static/quickstart.png" in generated_content.quickstart_figure_markdown()
  assert "{include} ../benchmarks/RESULTS.md" in generated_content.benchmark_results_markdown()


def test_bundled_page_without_and_with_optimizers(monkeypatch, saved_checkpoint, tmp_path):
  from optax_learned._src import checkpoint  # pylint: disable=import-outside-toplevel

  root = tmp_path / "checkpoints"
  root.mkdir()
  monkeypatch.setattr(checkpoint, "bundled_root", lambda: root)
  assert "No learned optimizer ships" in generated_content.bundled_markdown()
  shutil.copytree(saved_checkpoint, root / "tiny")
  text = generated_content.bundled_markdown()
  assert "`tiny`" in text and "for the table" in text and "none yet" in text
  (root / "tiny" / "MODEL_CARD.md").write_text("# Tiny\n")
  monkeypatch.setattr(generated_content, "REPO_ROOT", tmp_path)
  text = generated_content.bundled_markdown()
  assert "{include} ../checkpoints/tiny/MODEL_CARD.md" in text
  assert "(model-card-tiny)=" in text


def test_bundled_page_counts_a_fine_tunes_meta_steps_with_its_parents():
  row = next(line for line in generated_content.bundled_markdown().splitlines()
             if line.startswith("| `cifar` |"))
  metadata = optax_learned.load_metadata("cifar")
  parent, own = metadata["fine_tuned_from"]["meta_steps"], metadata["summary"]["meta_steps"]
  assert f"{parent} meta-steps, then a fine-tune of {own} meta-steps" in row, row


def test_every_generated_marker_has_a_generator():
  for page in list(DOCS.rglob("*.md")) + list(DOCS.rglob("*.rst")):
    if "_build" in page.parts:
      continue
    for name in generated_content.MARKER.findall(page.read_text()):
      assert name in generated_content.GENERATORS, (page, name)


# -- the bad-input table --------------------------------------------------------------------------

_CASES = generated_content.load_bad_inputs()["cases"]
_LOPT = optax_learned.LearnedOptimizer(hidden_sizes=(6, 5), time_scales=(10.0, 100.0),
                                       output_init_scale=0.5)


def _meta_params(lopt=_LOPT, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda spec: jnp.asarray(rng.normal(size=spec.shape), jnp.float32),
                      lopt.meta_params_shapes())


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("bad_inputs") / "ckpt"
  optax_learned.save(path, _LOPT, _meta_params(), metadata={"description": "for the table"})
  return path


class _Context:
  """What a trigger may use: a fresh directory, monkeypatch and a pristine checkpoint copy."""

  def __init__(self, tmp_path, monkeypatch, saved):
    self.tmp, self.monkeypatch, self._saved = tmp_path, monkeypatch, saved

  def checkpoint(self) -> pathlib.Path:
    destination = self.tmp / "ckpt"
    if not destination.exists():
      shutil.copytree(self._saved, destination)
    return destination

  def edit_config(self, edit) -> pathlib.Path:
    path = self.checkpoint()
    config = json.loads((path / "optimizer.json").read_text())
    edit(config)
    (path / "optimizer.json").write_text(json.dumps(config))
    return path

  def write_config(self, text: str) -> pathlib.Path:
    path = self.checkpoint()
    (path / "optimizer.json").write_text(text)
    return path

  def rewrite_weights(self, tree) -> pathlib.Path:
    path = self.checkpoint()
    shutil.rmtree(path / "weights")
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save((path / "weights").absolute(), tree)
      checkpointer.wait_until_finished()
    return path

  def cli(self, *argv) -> tuple[int, str]:
    from metatrain import cli  # pylint: disable=import-outside-toplevel

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
      try:
        status = cli.main([str(a) for a in argv])
      except SystemExit as e:  # argparse
        status = e.code
    return status, stderr.getvalue()


def _quadratic(*overrides):
  from metatrain import configs  # pylint: disable=import-outside-toplevel
  return configs.get_config("quadratic").with_overrides(list(overrides))


def _trainer():
  from metatrain import trainer  # pylint: disable=import-outside-toplevel
  return trainer


def _tiny_tx(**kwargs):
  lopt = optax_learned.LearnedOptimizer(hidden_sizes=(4,), output_init_scale=1.0, **kwargs)
  return lopt, lopt.transform(_meta_params(lopt))


def _params():
  return {"w": jnp.ones(3), "b": jnp.ones(2)}


def _write_npz(directory: pathlib.Path, rows=10, **arrays):
  directory.mkdir(parents=True, exist_ok=True)
  values = {"x": np.zeros((rows, 32, 32, 3), np.uint8), "y": np.arange(rows) % 10}
  values.update(arrays)
  values = {k: v for k, v in values.items() if v is not None}
  np.savez(directory / "cifar10_train.npz", **values)
  return directory


def _no_data_env(c):
  c.monkeypatch.delenv("OPTAX_LEARNED_DATA", raising=False)
  c.monkeypatch.setenv("TFDS_DATA_DIR", str(c.tmp / "no_tfds"))


def _skipped_step(c):
  lopt, tx = _tiny_tx()
  params = _params()
  _, state = tx.update(params, tx.init(params), params)
  bad = {"w": jnp.array([1.0, jnp.nan, jnp.inf]), "b": jnp.ones(2)}
  updates, new_state = tx.update(bad, state, params)
  # Element by element: the NaN and the infinity get zero updates and keep their
  # accumulators; the finite elements (of that leaf too) are updated; the count advances.
  assert updates["w"][1:].tolist() == [0.0, 0.0]
  assert bool(updates["w"][0] != 0) and bool(jnp.all(updates["b"] != 0))
  for accumulator in ("mu", "nu"):
    new, old = getattr(new_state, accumulator), getattr(state, accumulator)
    np.testing.assert_array_equal(new["w"][1:], old["w"][1:])
    assert bool(new["w"][0] != old["w"][0])
  assert int(new_state.count) == int(state.count) + 1
  finite = lambda tree: all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))
  assert finite((updates, new_state))
  # Derivatives through the skipped elements are zeros, not NaN.
  step = lambda mp: lopt.transform(mp).update(bad, state, params)[0]
  skipped = jax.grad(lambda mp: jnp.sum(step(mp)["w"][1:]))(_meta_params(lopt))
  assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(skipped))
  kept = jax.grad(lambda mp: jnp.sum(step(mp)["w"][:1]))(_meta_params(lopt))
  assert finite(kept) and any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(kept))
  # A step whose gradients are all non-finite changes nothing but the count.
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), params)
  updates, nan_state = tx.update(nan, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  for new, old in zip(jax.tree.leaves((nan_state.mu, nan_state.nu)),
                      jax.tree.leaves((state.mu, state.nu)), strict=True):
    np.testing.assert_array_equal(new, old)
  assert int(nan_state.count) == int(state.count) + 1


def _nan_propagates(c):
  _, tx = _tiny_tx(skip_nonfinite=False)
  params = _params()
  updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0, 1.0]), "b": jnp.ones(2)},
                             tx.init(params), params)
  # The element that holds the NaN: its update and accumulators; no other element.
  assert bool(jnp.isnan(updates["w"][0])) and bool(jnp.isnan(state.mu["w"][0]))
  assert bool(jnp.all(jnp.isfinite(updates["w"][1:])))
  assert bool(jnp.all(jnp.isfinite(updates["b"])))
  assert int(state.count) == 1
  # Infinities are clipped to 1e18 like any huge gradient: everything stays finite.
  updates, state = tx.update({"w": jnp.array([jnp.inf, 1.0, -jnp.inf]), "b": jnp.ones(2)},
                             tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((updates, state)))


def _extremes_stay_finite(c):
  lopt, _ = _tiny_tx()
  finite = lambda tree: all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))
  for grad_value, param_value in [(1e30, 1.0), (1e-30, 0.0), (0.0, 0.0), (-1e30, 1e30)]:
    grads = {"w": jnp.full((3, 2), grad_value), "v": jnp.asarray([grad_value, 0.0, -1.0])}
    params = {"w": jnp.full((3, 2), param_value), "v": jnp.asarray([param_value, 0.0, 1.0])}

    def two_steps(meta_params, grads=grads, params=params):
      tx = lopt.transform(meta_params)
      updates, state = tx.update(grads, tx.init(params), params)
      params2 = optax.apply_updates(params, updates)
      updates, state = tx.update(grads, state, params2)
      return updates, state

    updates, state = two_steps(_meta_params(lopt))
    assert finite(updates) and finite(state), (grad_value, param_value)
    meta_grad = jax.grad(lambda mp: sum(jnp.sum(jnp.sin(u)) for u in jax.tree.leaves(
        two_steps(mp)[0])))(_meta_params(lopt))
    assert finite(meta_grad), (grad_value, param_value)


def _extra_arguments_ignored(c):
  _, tx = _tiny_tx()
  params = _params()
  state = tx.init(params)
  plain = tx.update(params, state, params)
  extras = tx.update(params, state, params, value=jnp.float32(1.0), anything=3)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(extras), strict=True):
    np.testing.assert_array_equal(a, b)


def _workdir_in_use(c):
  """Trains in a work directory while this process holds its lock (as another run would)."""
  trainer = _trainer()
  with trainer.workdir_lock(c.tmp):
    trainer.MetaTrainer(_quadratic(), c.tmp, progress=False).train()


def _evaluate_unknown_optimizer(c):
  from metatrain import evaluation  # pylint: disable=import-outside-toplevel

  cache = c.tmp / "cache"
  try:
    evaluation.evaluate("nope", "linear_regression", steps=2, seeds=1, out_dir=c.tmp / "out",
                        baselines=("adam",), learning_rates=(1e-3,), cache_dir=cache)
  finally:
    # The row says the optimizer is loaded before any baseline is trained.
    assert not any(cache.rglob("*.json")), "a baseline was trained first: update the row"


TRIGGERS = {
    # load
    "load-unknown-name": lambda c: (c.monkeypatch.chdir(c.tmp), optax_learned.load("nope")),
    "load-invalid-name": lambda c: (c.monkeypatch.chdir(c.tmp), optax_learned.load(".hidden")),
    "load-wrong-type": lambda c: optax_learned.load(3),
    "load-missing-directory": lambda c: optax_learned.load(c.tmp / "nowhere"),
    "load-not-a-checkpoint": lambda c: optax_learned.load(c.tmp),
    "load-config-not-json": lambda c: optax_learned.load(c.write_config("{not json")),
    "load-config-not-object": lambda c: optax_learned.load(c.write_config("[1, 2]")),
    "load-config-missing-key": lambda c: optax_learned.load(
        c.edit_config(lambda d: d.pop("optimizer"))),
    "load-config-unknown-key": lambda c: optax_learned.load(
        c.edit_config(lambda d: d.update(weights_sha="0"))),
    "load-config-bad-version": lambda c: optax_learned.load(
        c.edit_config(lambda d: d.update(format_version="1"))),
    "load-config-version-1": lambda c: optax_learned.load(
        c.edit_config(lambda d: d.update(format_version=1))),
    "load-config-newer-version": lambda c: optax_learned.load(
        c.edit_config(lambda d: d.update(format_version=optax_learned.FORMAT_VERSION + 1))),
    "load-config-metadata-not-object": lambda c: optax_learned.load(
        c.edit_config(lambda d: d.update(metadata=[1]))),
    "load-optimizer-not-object": lambda c: optax_learned.load(
        c.edit_config(lambda d: d.update(optimizer=[1]))),
    "load-optimizer-missing-field": lambda c: optax_learned.load(
        c.edit_config(lambda d: d["optimizer"].pop("matrix_step"))),
    "load-optimizer-unknown-field": lambda c: optax_learned.load(
        c.edit_config(lambda d: d["optimizer"].update(learning_rate=1.0))),
    "load-optimizer-invalid-value": lambda c: optax_learned.load(
        c.edit_config(lambda d: d["optimizer"].update(hidden_sizes=[-1]))),
    "load-optimizer-nan": lambda c: optax_learned.load(c.write_config(re.sub(
        r'"matrix_step": [^,}\s]+', '"matrix_step": NaN',
        (c.checkpoint() / "optimizer.json").read_text()))),
    "load-weights-missing": lambda c: (shutil.rmtree(c.checkpoint() / "weights"),
                                       optax_learned.load(c.checkpoint())),
    "load-weights-unreadable": lambda c: (
        [p.write_bytes(b"") for p in (c.checkpoint() / "weights").rglob("*") if p.is_file()],
        optax_learned.load_weights(c.checkpoint())),
    "load-weights-shape-mismatch": lambda c: optax_learned.load_weights(
        c.edit_config(lambda d: d["optimizer"].update(hidden_sizes=[7, 5]))),
    "load-weights-extra-or-missing": lambda c: optax_learned.load_weights(c.rewrite_weights(
        {**jax.tree.map(np.asarray, _meta_params()), "payload": np.zeros(3, np.float32)})),
    "load-weights-dtype": lambda c: optax_learned.load_weights(c.rewrite_weights(
        jax.tree.map(lambda x: np.asarray(x, np.float16), _meta_params()))),
    "load-weights-nonfinite": lambda c: optax_learned.load_weights(c.rewrite_weights(
        jax.tree.map(np.asarray, {**_meta_params(), "layer_1": {
            "w": _meta_params()["layer_1"]["w"].at[0, 0].set(jnp.inf),
            "b": _meta_params()["layer_1"]["b"]}}))),
    # save
    "save-exists": lambda c: optax_learned.save(c.checkpoint(), _LOPT, _meta_params()),
    "save-overwrite-non-checkpoint": lambda c: (
        (c.tmp / "precious").mkdir(), (c.tmp / "precious" / "data.txt").write_text("keep"),
        optax_learned.save(c.tmp / "precious", _LOPT, _meta_params(), overwrite=True)),
    "save-metadata-not-json": lambda c: optax_learned.save(
        c.tmp / "new", _LOPT, _meta_params(), metadata={"f": object()}),
    "save-wrong-shapes": lambda c: optax_learned.save(
        c.tmp / "new", _LOPT, _meta_params(optax_learned.LearnedOptimizer(hidden_sizes=(3,)))),
    "save-nonfinite": lambda c: optax_learned.save(c.tmp / "new", _LOPT, {
        **_meta_params(), "log_base_step": _meta_params()["log_base_step"].at[0].set(jnp.nan)}),
    # config
    "config-hidden-sizes-nonpositive": lambda c: optax_learned.LearnedOptimizer(
        hidden_sizes=(0,)),
    "config-hidden-sizes-type": lambda c: optax_learned.LearnedOptimizer(hidden_sizes="32"),
    "config-beta-range": lambda c: optax_learned.LearnedOptimizer(beta1=1.0),
    "config-number-not-finite": lambda c: optax_learned.LearnedOptimizer(
        matrix_step=float("nan")),
    "config-time-scales": lambda c: optax_learned.LearnedOptimizer(time_scales=(0.0,)),
    "config-step-nonpositive": lambda c: optax_learned.LearnedOptimizer(matrix_step=0.0),
    "config-max-log-correction": lambda c: optax_learned.LearnedOptimizer(
        max_log_correction=0.0),
    "config-gradient-mix": lambda c: optax_learned.LearnedOptimizer(initial_gradient_mix=1.0),
    "config-epsilon": lambda c: optax_learned.LearnedOptimizer(epsilon=0.0),
    "config-activation": lambda c: optax_learned.LearnedOptimizer(activation="swish"),
    "config-skip-nonfinite": lambda c: optax_learned.LearnedOptimizer(skip_nonfinite=1),
    "config-from-dict-unknown": lambda c: optax_learned.LearnedOptimizer.from_dict(
        {"hiden_sizes": [3]}),
    "config-from-dict-not-dict": lambda c: optax_learned.LearnedOptimizer.from_dict([1]),
    "config-transform-other-shapes": lambda c: optax_learned.LearnedOptimizer(
        hidden_sizes=(4,)).transform(_meta_params(optax_learned.LearnedOptimizer(
            hidden_sizes=(5,)))),
    "config-num-steps-not-positive": lambda c: optax_learned.load("cifar", num_steps=0),
    "config-num-steps-type": lambda c: optax_learned.load("cifar", num_steps=2.5),
    "config-anneal-steps-not-positive": lambda c: optax_learned.LearnedOptimizer(
        anneal_steps=0),
    "config-anneal-steps-type": lambda c: optax_learned.LearnedOptimizer(anneal_steps=True),
    "config-weight-decay-negative": lambda c: optax_learned.LearnedOptimizer(
        weight_decay=-1e-4),
    # update
    "update-missing-params": lambda c: _tiny_tx()[1].update(_params(),
                                                            _tiny_tx()[1].init(_params())),
    "update-integer-leaf": lambda c: _tiny_tx()[1].init(
        {"w": jnp.ones(3), "step": jnp.asarray(4, jnp.int32)}),
    "update-non-array-leaf": lambda c: _tiny_tx()[1].init({"name": "conv", "w": jnp.ones(2)}),
    "update-other-structure": lambda c: _tiny_tx()[1].update(
        {"w": jnp.ones(3)}, _tiny_tx()[1].init(_params()), _params()),
    "update-other-shapes": lambda c: _tiny_tx()[1].update(
        {"w": jnp.ones((3, 1)), "b": jnp.ones(2)}, _tiny_tx()[1].init(_params()), _params()),
    "update-swapped-arguments": lambda c: _tiny_tx()[1].update(
        _params(), _params(), _tiny_tx()[1].init(_params())),
    "update-nonfinite-skipped": _skipped_step,
    "update-nonfinite-not-skipped": _nan_propagates,
    "update-extreme-values": _extremes_stay_finite,
    "update-extra-arguments": _extra_arguments_ignored,
    # metatrain config
    "runconfig-estimator": lambda c: _quadratic("estimator.name=sgd"),
    "runconfig-merged-es": lambda c: _quadratic("estimator.merged_es=pathwise"),
    "runconfig-horizons": lambda c: _quadratic("truncation.length=100"),
    "runconfig-sigma": lambda c: _quadratic("estimator.sigma=0"),
    "runconfig-particles": lambda c: _quadratic("estimator.num_tasks=0"),
    "runconfig-particle-chunk": lambda c: _quadratic("estimator.particle_chunk=3"),
    "runconfig-meta-loss-every": lambda c: _quadratic("truncation.meta_loss_every=3"),
    "runconfig-split": lambda c: _quadratic("truncation.meta_loss_split=test"),
    "runconfig-loss-clip": lambda c: _quadratic("truncation.loss_clip=0"),
    "runconfig-counts": lambda c: _quadratic("steps=0"),
    "runconfig-value-type": lambda c: _quadratic("estimator.sigma=abc"),
    "runconfig-unknown-key": lambda c: _quadratic("sigm=0.1"),
    "runconfig-malformed-set": lambda c: _quadratic("sigma"),
    "runconfig-dotted-key": lambda c: _quadratic("estimator.kind=x"),
    "runconfig-unknown-config": lambda c: importlib.import_module(
        "metatrain.configs").get_config("nope"),
    "runconfig-unknown-task": lambda c: importlib.import_module(
        "metatrain.tasks").get_task("nope"),
    "runconfig-task-override": lambda c: importlib.import_module(
        "metatrain.tasks").get_task("digits_mlp", width=3),
    "runconfig-optimizer-invalid": lambda c: _trainer().MetaTrainer(
        _quadratic("optimizer.activation=swish"), c.tmp / "run"),
    "runconfig-optimizer-unknown": lambda c: _trainer().MetaTrainer(
        _quadratic("optimizer.bogus=1"), c.tmp / "run"),
    # metatrain runs
    "run-init-from-other-config": lambda c: _trainer().MetaTrainer(
        _quadratic(f"init_from={c.checkpoint()}"), c.tmp / "run").init_state(),
    "run-init-from-missing": lambda c: (c.monkeypatch.chdir(c.tmp), _trainer().MetaTrainer(
        _quadratic("init_from=nope"), c.tmp / "run").init_state()),
    "run-devices": lambda c: _trainer().MetaTrainer(_quadratic(), c.tmp / "run",
                                                    devices=jax.devices()[:1] * 3),
    "run-workdir-unwritable": lambda c: (
        (c.tmp / "file").write_text("not a directory"),
        _trainer().MetaTrainer(_quadratic(), c.tmp / "file" / "run", progress=False).train()),
    "run-workdir-other-config": lambda c: (
        (c.tmp / "config.json").write_text(json.dumps(_quadratic().to_dict())),
        _trainer().MetaTrainer(_quadratic("estimator.sigma=0.5"), c.tmp, progress=False).train()),
    "run-workdir-bad-config": lambda c: (
        (c.tmp / "config.json").write_text("not json"),
        _trainer().MetaTrainer(_quadratic(), c.tmp, progress=False).train()),
    "run-workdir-in-use": _workdir_in_use,
    "export-not-a-workdir": lambda c: _trainer().export(c.tmp / "nothing", c.tmp / "out"),
    "export-no-checkpoint": lambda c: (
        (c.tmp / "config.json").write_text(json.dumps(_quadratic().to_dict())),
        _trainer().export(c.tmp, c.tmp / "out")),
    "diagnose-lengths": lambda c: importlib.import_module("metatrain.diagnostics").diagnose(
        _quadratic(), c.tmp / "out", lengths=(0,)),
    "diagnose-slice-points": lambda c: importlib.import_module(
        "metatrain.diagnostics").diagnose(_quadratic(), c.tmp / "out", slice_points=2),
    "evaluate-unknown-baseline": lambda c: importlib.import_module(
        "metatrain.evaluation").evaluate(None, "linear_regression", out_dir=c.tmp,
                                         baselines=("adamw",)),
    "evaluate-bad-counts": lambda c: importlib.import_module(
        "metatrain.evaluation").evaluate(None, "linear_regression", out_dir=c.tmp, steps=0),
    "evaluate-unknown-optimizer": _evaluate_unknown_optimizer,
    # data
    "data-none": lambda c: (_no_data_env(c),
                            importlib.import_module("metatrain.data").load_cifar10()),
    "data-missing-directory": lambda c: importlib.import_module(
        "metatrain.data").load_cifar10(c.tmp / "missing"),
    "data-corrupt-npz": lambda c: (
        (c.tmp / "cifar10_train.npz").write_bytes(b"not a zip file"),
        importlib.import_module("metatrain.data").load_cifar10(c.tmp)),
    "data-npz-keys": lambda c: importlib.import_module("metatrain.data").load_cifar10(
        _write_npz(c.tmp / "d", y=None)),
    "data-npz-dtype": lambda c: importlib.import_module("metatrain.data").load_cifar10(
        _write_npz(c.tmp / "d", x=np.zeros((10, 32, 32, 3), np.float32))),
    "data-validation-size": lambda c: importlib.import_module("metatrain.data").load_cifar10(
        _write_npz(c.tmp / "d"), validation_size=10),
    "data-holdout-size": lambda c: importlib.import_module("metatrain.data").load_cifar10(
        _write_npz(c.tmp / "d"), validation_size=2, holdout_size=-1),
    "data-resolution-above-stored": lambda c: importlib.import_module(
        "metatrain.tasks").get_task("cifar_conv_32", validation_size=2, data_dir=str(_write_npz(
            c.tmp / "d", x=np.zeros((10, 16, 16, 3), np.uint8)))).load_data(),
    "task-validate-on": lambda c: importlib.import_module("metatrain.tasks").get_task(
        "cifar_conv_8", validate_on="test"),
    # cli
    "cli-unknown-config": lambda c: c.cli("train", "--config", "nope", "--workdir", c.tmp),
    "cli-missing-argument": lambda c: c.cli("train", "--config", "quadratic"),
    "cli-bad-set": lambda c: c.cli("train", "--config", "quadratic", "--workdir", c.tmp,
                                   "--set", "sigm=0.1"),
    "cli-other-run": lambda c: (
        (c.tmp / "config.json").write_text(json.dumps(_quadratic().to_dict())),
        c.cli("train", "--config", "quadratic", "--workdir", c.tmp, "--set",
              "estimator.sigma=0.5"))[1],
    "cli-coordinator-incomplete": lambda c: c.cli("train", "--config", "quadratic", "--workdir",
                                                  c.tmp, "--coordinator", "localhost:1"),
    "cli-export-not-a-workdir": lambda c: c.cli("export", "--workdir", c.tmp / "x", "--out",
                                                c.tmp / "out"),
    "cli-diagnose-bad-optimizer": lambda c: c.cli("diagnose", "--config", "quadratic", "--out",
                                                  c.tmp / "d", "--optimizer", "nope"),
}


def _assert_in_order(fragments: list[str], text: str) -> None:
  position = 0
  for fragment in fragments:
    found = text.find(fragment, position)
    assert found >= 0, f"{fragment!r} not found (in order) in:\n{text}"
    position = found + len(fragment)


def test_every_row_has_a_trigger_and_every_trigger_a_row():
  rows = {case["id"] for case in _CASES if "checked_by" not in case}
  assert rows == set(TRIGGERS), (sorted(rows - set(TRIGGERS)), sorted(set(TRIGGERS) - rows))


@pytest.mark.parametrize("case", [c for c in _CASES if "checked_by" in c], ids=lambda c: c["id"])
def test_rows_checked_by_other_tests_name_existing_tests(case):
  path, _, name = case["checked_by"].partition("::")
  tree = ast.parse((REPO / path).read_text())
  assert name in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}, (
      case["checked_by"])


@pytest.mark.parametrize("case", [c for c in _CASES if "checked_by" not in c],
                         ids=lambda c: c["id"])
def test_bad_input_row_matches_the_code(case, tmp_path, monkeypatch, saved_checkpoint):
  context = _Context(tmp_path, monkeypatch, saved_checkpoint)
  trigger = TRIGGERS[case["id"]]
  if "raises" in case:
    expected = generated_content.resolve(case["raises"])
    with pytest.raises(BaseException) as info:
      trigger(context)
    assert type(info.value) is expected, (type(info.value), info.value)  # pylint: disable=unidiomatic-typecheck
    _assert_in_order(case["gist"], str(info.value))
  elif "exit_status" in case:
    status, stderr = trigger(context)
    assert status == case["exit_status"], stderr
    _assert_in_order(case["gist"], stderr)
  else:
    trigger(context)  # asserts the outcome itself, and must not raise


def test_bad_inputs_page_renders_every_row():
  text = generated_content.bad_inputs_markdown()
  for case in _CASES:
    assert case["input"].replace("|", r"\|") in text, case["id"]
  for name in ("LearnedOptimizerError", "CheckpointError", "InvalidTreeError",
               "MissingParamsError", "CheckpointVersionError"):
    assert f"optax_learned.{name}`" in text, name
