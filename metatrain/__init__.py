"""metatrain: meta-training learned optimizers with pathwise, ES, PES and merged estimators.

References:
  Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
  optimizers", ICML. arXiv:1810.10180.
  Vicol, Metz, Sohl-Dickstein 2021, "Unbiased gradient estimation in unrolled computation
  graphs with persistent evolution strategies", ICML. arXiv:2112.13835.
"""

import importlib

# Names are imported on first use (PEP 562), so that `import metatrain` and `metatrain list`
# do not load Orbax, matplotlib or the estimators.
_EXPORTS = {
    "RunConfig": "configs", "get_config": "configs",
    "Estimator": "estimators", "EstimatorConfig": "estimators",
    "EstimatorState": "estimators", "antithetic_es_gradient": "estimators",
    "merge_by_inverse_variance": "estimators", "pathwise_gradient": "estimators",
    "pes_gradient": "estimators",
    "Task": "tasks", "get_family": "tasks", "get_task": "tasks",
    "MetaTrainer": "trainer", "MetaTrainState": "trainer", "WorkdirError": "trainer",
    "export": "trainer",
    "InnerState": "truncation", "TruncationConfig": "truncation", "unroll": "truncation",
}


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"metatrain.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'metatrain' has no attribute {name!r}")


__all__ = (
    "Estimator",
    "EstimatorConfig",
    "EstimatorState",
    "InnerState",
    "MetaTrainState",
    "MetaTrainer",
    "RunConfig",
    "Task",
    "TruncationConfig",
    "WorkdirError",
    "antithetic_es_gradient",
    "export",
    "get_config",
    "get_family",
    "get_task",
    "merge_by_inverse_variance",
    "pathwise_gradient",
    "pes_gradient",
    "unroll",
)
