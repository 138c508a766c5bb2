"""Tasks on the shared trainer, chosen by `config.task`."""
from __future__ import annotations

import ml_collections

from mae_jax.tasks.base import Aux, Task
from mae_jax.tasks.finetune import FinetuneTask
from mae_jax.tasks.linear_probe import KnnTask, LinearProbeTask
from mae_jax.tasks.pretrain import PretrainTask

TASKS: dict[str, type[Task]] = {"pretrain": PretrainTask, "linear_probe": LinearProbeTask,
                                 "knn": KnnTask, "finetune": FinetuneTask}


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The task named by `config.task` (default 'pretrain'), its config checked."""
  name = config.get("task", "pretrain")
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
  return TASKS[name](config)


__all__ = ["Aux", "Task", "TASKS", "make_task"]
