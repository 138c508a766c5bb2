"""Weighted kNN accuracy of frozen features (cosine similarity, k = 20, T = 0.07).

The feature bank is the training split seen through the evaluation view (no augmentation),
kept as a global array sharded over every device of every host; each test feature votes
with its k most similar bank entries, weighted by exp(similarity / T).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from mae_jax import sharding
from mae_jax.data import sources
from mae_jax.evals.common import EvalData, accuracies, topk_correct
from mae_jax.metrics import MetricWriter


def knn_scores(features: jax.Array, bank: jax.Array, bank_labels: jax.Array,
               bank_valid: jax.Array, num_classes: int, k: int, temperature: float
               ) -> jax.Array:
  """Class scores [B, C]: sum over the k nearest bank entries of exp(sim / T) per class.

  features: [B, D]; bank: [M, D] (both L2-normalised here); bank_labels, bank_valid: [M]
  (padding rows have valid 0 and never vote).
  """
  f, b = features.astype(jnp.float32), bank.astype(jnp.float32)
  f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
  b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
  sim = jnp.where(bank_valid[None] > 0, f @ b.T, -jnp.inf)  # [B, M]
  top_sim, top_idx = jax.lax.top_k(sim, k)  # [B, k]
  weights = jnp.where(jnp.isfinite(top_sim), jnp.exp(top_sim / temperature), 0.0)
  votes = jax.nn.one_hot(bank_labels[top_idx], num_classes) * weights[..., None]  # [B, k, C]
  return votes.sum(1)


class KnnEvaluator:
  """kNN top-1 / top-5 of `task.features` on `split`, with the bank from `train_split`."""

  def __init__(self, name: str, config: ml_collections.ConfigDict, task: Any, mesh: Mesh,
               every_steps: int = 0, k: int = 20, temperature: float = 0.07,
               pool: str = "cls", train_split: str | None = None, split: str | None = None,
               batch_size: int | None = None):
    self.name, self.every_steps = name, every_steps
    self.bank_data = EvalData(name, config, mesh, task.image_size,
                              train_split or config.input.split, batch_size)
    self.data = EvalData(name, config, mesh, task.image_size, split, batch_size)
    num_classes = sources.class_count(self.bank_data.source)
    if num_classes is None:
      raise ValueError(f"config.evals.{name}: split {self.bank_data.split!r} has no labels; "
                       "kNN needs them")
    sources.check_num_classes(num_classes, self.data.source, f"split {self.data.split!r}")
    if not 1 <= k <= len(self.bank_data.source):
      raise ValueError(f"config.evals.{name}: k must be in [1, {len(self.bank_data.source)}] "
                       f"(the bank size), got {k}")
    batch = sharding.batch_sharding(mesh)
    self._features = jax.jit(lambda p, s, images: task.features(p, s, images, pool),
                             out_shardings=batch)
    self._concat = jax.jit(lambda xs: jnp.concatenate(xs), out_shardings=batch)

    def counts(features, label, valid, bank, bank_labels, bank_valid):
      scores = knn_scores(features, bank, bank_labels, bank_valid, num_classes, k, temperature)
      return topk_correct(scores, label, valid)
    self._counts = jax.jit(counts, out_shardings=sharding.replicated(mesh))

  def _embed(self, state: dict[str, Any], data: EvalData):
    for batch in data.batches():
      yield (self._features(state["params"], state.get("model_state", {}), batch["image"]),
             batch["label"], batch["valid"])

  def run(self, state: dict[str, Any], step: int, workdir: str,
          writer: MetricWriter) -> dict[str, float]:
    bank = [self._concat(list(x)) for x in zip(*self._embed(state, self.bank_data))]
    totals = None
    for features, label, valid in self._embed(state, self.data):
      c = self._counts(features, label, valid, *bank)
      totals = c if totals is None else jax.tree.map(lambda a, b: a + b, totals, c)
    return accuracies(jax.device_get(totals))
