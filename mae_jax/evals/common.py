"""What the evaluators share: the evaluation split, its loader and batch size, and counts."""
from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from mae_jax import sharding
from mae_jax.data import pipeline


class EvalData:
  """One split read for evaluation: every record exactly once over all hosts per pass.

  The split is opened (and so checked) when this is built, before anything is written.
  """

  def __init__(self, name: str, config: ml_collections.ConfigDict, mesh: Mesh,
               image_size: int, split: str | None, batch_size: int | None):
    self.split = split or pipeline.eval_split(config.input)
    self.batch_size = batch_size or config.batch_size
    devices = mesh.devices.size
    if self.batch_size % devices:
      raise ValueError(f"config.evals.{name}: batch size {self.batch_size} is not divisible by "
                       f"the {devices} devices; set config.evals.{name}.batch_size")
    self.input, self.image_size = config.input, image_size
    self.source = pipeline.make_source(config.input, self.split)
    self.sharding = sharding.batch_sharding(mesh)

  def batches(self) -> Iterator[dict[str, jax.Array]]:
    """Global batches {'image', 'label', 'valid'}; `valid` is 0 on padding rows."""
    loader = pipeline.make_eval_loader(self.input, self.split, image_size=self.image_size,
                                       global_batch_size=self.batch_size, source=self.source)
    for batch in loader:
      yield pipeline.to_global_array(batch, self.sharding)


def topk_correct(scores: jax.Array, labels: jax.Array, valid: jax.Array
                 ) -> dict[str, jax.Array]:
  """Counts over valid rows: {'top1', 'top5', 'count'} (int32 sums) of [B, C] scores."""
  k = min(5, scores.shape[-1])
  top = jax.lax.top_k(scores, k)[1]  # [B, k]
  hit = top == labels[:, None]
  valid = valid.astype(jnp.int32)
  return {"top1": jnp.sum(hit[:, 0] * valid), "top5": jnp.sum(hit.any(-1) * valid),
          "count": jnp.sum(valid)}


def accuracies(totals: dict[str, Any]) -> dict[str, float]:
  """Summed counts -> top-1 / top-5 accuracy (in [0, 1]) and the number of examples."""
  n = int(totals["count"])
  return {"top1": int(totals["top1"]) / n, "top5": int(totals["top5"]) / n, "count": n}
