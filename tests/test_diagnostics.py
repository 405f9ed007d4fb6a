"""Tests of the pathology diagnostics (meta-loss slices, gradient norms, variances)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import toy_problems as toy

from metatrain import configs, diagnostics, estimators, truncation

PER_LENGTH = ("meta_loss", "pathwise_norm", "pathwise_sample_norm", "es_weight")


def test_diagnose_quadratic_writes_a_complete_finite_report(tmp_path):
  lengths, points = (2, 4, 6), 5
  report = diagnostics.diagnose(configs.get_config("quadratic"), tmp_path, lengths=lengths,
                                slice_points=points, num_samples=8)

  assert json.loads((tmp_path / diagnostics.JSON_FILE).read_text()) == report
  for name in report["files"]:
    assert (tmp_path / name).stat().st_size > 0, name
  for name in diagnostics.PLOT_FILES.values():
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

  assert report["lengths"] == list(lengths)
  assert report["num_particles"] == 4 and report["repeats"] == 2
  assert report["task"] == "linear_regression_d8"
  assert np.asarray(report["slice"]["alphas"]).shape == (points,)
  assert np.asarray(report["slice"]["meta_loss"]).shape == (len(lengths), points)
  assert np.asarray(report["slice"]["roughness"]).shape == (len(lengths),)
  for key in PER_LENGTH:
    assert np.asarray(report[key]).shape == (len(lengths),), key
  for key in ("norm", "variance"):
    assert set(report[key]) == set(estimators.ESTIMATORS), key
    for values in report[key].values():
      assert np.asarray(values).shape == (len(lengths),), key
  numbers = [report["slice"]["meta_loss"], report["slice"]["roughness"],
             *(report[key] for key in PER_LENGTH),
             *report["norm"].values(), *report["variance"].values()]
  for values in numbers:
    assert np.all(np.isfinite(np.asarray(values, np.float64))), values
  assert all(v > 0 for v in report["variance"]["pathwise"] + report["variance"]["es"])
  # From fresh runs PES has nothing accumulated yet: it is antithetic ES.
  np.testing.assert_allclose(report["variance"]["pes"], report["variance"]["es"], rtol=1e-4)


def test_diagnose_reports_the_exploding_pathwise_gradient_of_each_length(tmp_path):
  # SGD with learning rate 2.2 on curvature 1 multiplies x by -1.2 per step: the loss grows
  # like 1.44^t and its meta-gradient faster, so the norm must explode with the length.
  task, lopt = toy.DeterministicQuadratic(), toy.LearnedStepSize(np.log(2.2))
  config = configs.get_config("quadratic").with_overrides(
      ["truncation.log_loss=false", "truncation.loss_clip=1e6", "estimator.sigma=1e-4"])
  lengths = (2, 4, 8, 16)
  report = diagnostics.diagnose(config, tmp_path, lengths=lengths, slice_points=5,
                                slice_radius=0.1, num_samples=4, task=task, lopt=lopt)

  norms = report["pathwise_norm"]
  assert all(b > 2 * a for a, b in zip(norms, norms[1:], strict=False)), norms
  assert norms[-1] > 100 * norms[0], norms

  # Each length's numbers are those of its own unroll: exact backprop through a fresh run
  # of that many steps, and the meta-loss at the slice centre.
  meta_params = lopt.init(None)
  centres = np.asarray(report["slice"]["meta_loss"])[:, 2]
  for length, norm, centre in zip(lengths, norms, centres, strict=True):
    tcfg = truncation.TruncationConfig(length=length, min_horizon=length, max_horizon=length,
                                       log_loss=False, loss_clip=1e6, stagger=False)

    def mean_meta_loss(theta, tcfg=tcfg):
      state = truncation.init_inner_state(task, lopt, theta, tcfg, jax.random.PRNGKey(0))
      return jnp.mean(truncation.unroll(task, lopt, tcfg, theta, state, {})[1].meta_losses)

    exact = jax.value_and_grad(mean_meta_loss)(meta_params)
    np.testing.assert_allclose(norm, abs(float(exact[1]["log_lr"])), rtol=1e-2)
    np.testing.assert_allclose(centre, float(exact[0]), rtol=1e-4)
