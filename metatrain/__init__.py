"""metatrain: meta-training learned optimizers with pathwise, ES, PES and merged estimators.

References:
  Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
  optimizers", ICML. arXiv:1810.10180.
  Vicol, Metz, Sohl-Dickstein 2021, "Unbiased gradient estimation in unrolled computation
  graphs with persistent evolution strategies", ICML. arXiv:2112.13835.
"""

from metatrain.configs import RunConfig
from metatrain.configs import get_config
from metatrain.estimators import Estimator
from metatrain.estimators import EstimatorConfig
from metatrain.estimators import EstimatorState
from metatrain.estimators import antithetic_es_gradient
from metatrain.estimators import merge_by_inverse_variance
from metatrain.estimators import pathwise_gradient
from metatrain.estimators import pes_gradient
from metatrain.tasks import Task
from metatrain.tasks import get_family
from metatrain.tasks import get_task
from metatrain.trainer import MetaTrainer
from metatrain.trainer import WorkdirError
from metatrain.trainer import export
from metatrain.truncation import InnerState
from metatrain.truncation import TruncationConfig
from metatrain.truncation import unroll

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
