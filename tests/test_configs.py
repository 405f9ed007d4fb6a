"""Run configs: nested sections, dotted --set keys and the flat keys of older runs."""

import dataclasses
import json

import pytest

from metatrain import configs, estimators, truncation

QUADRATIC = configs.get_config("quadratic")


def legacy_dict(config: configs.RunConfig) -> dict:
  """``config`` in the flat layout that configs were written in before the sections."""
  values = config.to_dict()
  where = {new: old for old, new in configs.LEGACY_KEYS.items()}
  for section in configs.SECTIONS:
    for field, value in values.pop(section).items():
      if f"{section}.{field}" in where:  # fields added since (e.g. stagger) keep defaults
        values[where[f"{section}.{field}"]] = value
  return values


@pytest.mark.parametrize("name", ["quadratic", "digits", "cifar"])  # the recipes of that time
def test_flat_configs_of_older_runs_read_as_the_same_config(name):
  config = configs.get_config(name)
  stored = json.loads(json.dumps(legacy_dict(config)))
  assert "sigma" in stored and "truncation" not in stored
  assert configs.RunConfig.from_dict(stored) == config
  assert configs.RunConfig.from_dict(config.to_dict()) == config


NEW_VALUES = {
    "estimator": {"name": "es", "merged_es": "es", "num_tasks": 3, "num_pairs": 4,
                  "sigma": 0.02, "particle_chunk": 2},
    "truncation": {"length": 10, "min_horizon": 30, "max_horizon": 70,
                   "meta_loss_split": "train", "log_loss": False, "loss_clip": 10.0,
                   "divergence_loss": 100.0, "stagger": False, "meta_loss_every": 5,
                   "remat": True, "max_segments": 3, "growth_steps": 50, "jitter": 0.2,
                   "late_weight_power": 1.5},
}


@pytest.mark.parametrize("section,cls", [("estimator", estimators.EstimatorConfig),
                                         ("truncation", truncation.TruncationConfig)])
def test_dotted_keys_reach_every_field_of_a_section(section, cls):
  assert set(NEW_VALUES[section]) == {f.name for f in dataclasses.fields(cls)}
  for field, value in NEW_VALUES[section].items():
    assert getattr(getattr(QUADRATIC, section), field) != value, field
    changed = QUADRATIC.with_overrides([f"{section}.{field}={json.dumps(value)}"])
    assert getattr(getattr(changed, section), field) == value, field
  everything = QUADRATIC.with_overrides(
      [f"{section}.{k}={json.dumps(v)}" for k, v in NEW_VALUES[section].items()])
  assert getattr(everything, section) == cls(**NEW_VALUES[section])


def test_flat_set_keys_still_work_and_name_their_new_key():
  with pytest.warns(DeprecationWarning, match="'sigma' is now 'estimator.sigma'"):
    old = QUADRATIC.with_overrides(["sigma=0.5", "truncation_length=10"])
  assert old == QUADRATIC.with_overrides(["estimator.sigma=0.5", "truncation.length=10"])
  assert old.estimator.sigma == 0.5 and old.truncation.length == 10


def test_bad_dotted_keys_are_named():
  with pytest.raises(ValueError, match=r"unknown config key 'truncation.lenght'; known keys of "
                                       r"truncation: \[.*'length'"):
    QUADRATIC.with_overrides(["truncation.lenght=5"])
  with pytest.raises(ValueError, match=r"dotted keys are .*estimator\.\*.*got 'steps.x'"):
    QUADRATIC.with_overrides(["steps.x=5"])
  with pytest.raises(TypeError, match="estimator.sigma must be a number, got 'abc'"):
    QUADRATIC.with_overrides(["estimator.sigma=abc"])
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['truncation.bogus'\]"):
    configs.RunConfig.from_dict({**QUADRATIC.to_dict(), "truncation": {"bogus": 1}})


def test_differences_name_section_fields_by_dotted_keys():
  other = QUADRATIC.with_overrides(["truncation.length=10", "estimator.particle_chunk=1",
                                    "steps=3"])
  assert other.differences(QUADRATIC) == {"truncation.length": (10, 5)}
