"""Top-1 / top-5 accuracy of a classifying task on a whole evaluation split."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from mae_jax import sharding
from mae_jax.data import sources
from mae_jax.evals.common import EvalData, accuracies, topk_correct
from mae_jax.metrics import MetricWriter


class ClassificationEvaluator:
  """Runs `task.logits` over every example of the split once; exact counts, no dropped or
  doubled example (padding rows are masked)."""

  def __init__(self, name: str, config: ml_collections.ConfigDict, task: Any, mesh: Mesh,
               every_steps: int = 0, split: str | None = None, batch_size: int | None = None):
    if not hasattr(task, "num_classes"):
      raise ValueError(f"config.evals.{name}: task {task.name!r} does not classify")
    self.name, self.every_steps = name, every_steps
    self.data = EvalData(name, config, mesh, task.image_size, split, batch_size)
    sources.check_num_classes(task.num_classes, self.data.source, f"split {self.data.split!r}")

    def counts(params, model_state, batch):
      scores = task.logits(params, model_state, batch["image"])
      return topk_correct(scores, batch["label"], batch["valid"])
    self._counts = jax.jit(counts, out_shardings=sharding.replicated(mesh))

  def run(self, state: dict[str, Any], step: int, workdir: str,
          writer: MetricWriter) -> dict[str, float]:
    totals = None
    for batch in self.data.batches():
      c = self._counts(state["params"], state.get("model_state", {}), batch)
      totals = c if totals is None else jax.tree.map(lambda a, b: a + b, totals, c)
    return accuracies(jax.device_get(totals))
