"""metatrain: meta-training learned optimizers with pathwise, ES, PES and merged estimators.

References:
  Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
  optimizers", ICML. arXiv:1810.10180.
  Vicol, Metz, Sohl-Dickstein 2021, "Unbiased gradient estimation in unrolled computation
  graphs with persistent evolution strategies", ICML. arXiv:2112.13835.
"""

from metatrain.configs import RunConfig, get_config
from metatrain.estimators import (
    Estimator,
    EstimatorConfig,
    EstimatorState,
    antithetic_es_gradient,
    merge_by_inverse_variance,
    pathwise_gradient,
    pes_gradient,
)
from metatrain.tasks import Task, get_family, get_task
from metatrain.trainer import MetaTrainer, WorkdirError, export
from metatrain.truncation import InnerState, TruncationConfig, unroll

__all__ = (
    "Estimator",
    "EstimatorConfig",
    "EstimatorState",
    "InnerState",
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
