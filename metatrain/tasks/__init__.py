"""Inner training problems for meta-training: the task protocol, tasks and task families."""

from metatrain.tasks.base import Task
from metatrain.tasks.cifar import CifarTask, MLPTask
from metatrain.tasks.convnet import ConvNetTask
from metatrain.tasks.digits import DigitsMLPTask
from metatrain.tasks.families import (
    CifarFamily,
    ConvNetFamily,
    DigitsMLPFamily,
    LinearRegressionFamily,
    TaskFamily,
    build_tasks,
    family_names,
    get_family,
    get_task,
    task_names,
    with_data_dir,
)
from metatrain.tasks.quadratic import LinearRegressionTask

__all__ = [
    "CifarFamily",
    "CifarTask",
    "ConvNetFamily",
    "ConvNetTask",
    "DigitsMLPFamily",
    "DigitsMLPTask",
    "LinearRegressionFamily",
    "LinearRegressionTask",
    "MLPTask",
    "Task",
    "TaskFamily",
    "build_tasks",
    "family_names",
    "get_family",
    "get_task",
    "task_names",
    "with_data_dir",
]
