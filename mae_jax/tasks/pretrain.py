"""MAE pretraining as a task: the masked-patch MSE, AdamW (0.9, 0.95), warmup + cosine."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from mae_jax import metrics, optim
from mae_jax.config import ModelConfig, config_from_dict
from mae_jax.mae import Params, features, forward, init_params
from mae_jax.tasks.base import Aux, Batch, ModelState, Task


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
  """`config.model` (every ModelConfig field) -> the frozen ModelConfig, checked."""
  return config_from_dict(config.model.to_dict())


class PretrainTask(Task):
  """Pretraining: `config.model` is an MAE (`ModelConfig` fields), state = params + AdamW."""

  name = "pretrain"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.model = model_config_from(config)

  @property
  def image_size(self) -> int:
    return self.model.image_size

  def model_dict(self) -> dict[str, Any]:
    return self.model.to_dict()

  def init(self, rng: jax.Array) -> tuple[Params, ModelState]:
    return init_params(self.model, rng), {}

  def load_init(self, path: str) -> Params:
    """Weights to start from (continued pretraining): an encoder-only file gives the
    encoder, with a freshly initialised decoder."""
    from mae_jax.weights import load_pretrained  # the file readers, only when asked for
    return load_pretrained(path, self.model)[0]  # checked against self.model

  def apply_init(self, loaded: Params, params: Params, model_state: ModelState
                 ) -> tuple[Params, ModelState]:
    return {**params, **loaded}, model_state

  def prepare_batch(self, batch: Batch, rng: jax.Array) -> Batch:
    b = batch["image"].shape[0]
    return {**batch, "noise": jax.random.uniform(rng, (b, self.model.num_patches))}  # [B, N]

  def loss_fn(self, params: Params, model_state: ModelState, batch: Batch, rng: jax.Array
              ) -> tuple[jax.Array, Aux]:
    del rng  # the masks come from batch['noise']
    loss = forward(params, batch["image"], None, self.model, batch["noise"]).loss
    return loss, Aux({}, model_state)

  def optimizer(self, peak_lr: float, warmup_steps: int, total_steps: int
                ) -> tuple[optax.Schedule, optax.GradientTransformation]:
    schedule = optim.lr_schedule(peak_lr, warmup_steps, total_steps)
    c = self.config
    return schedule, optim.make_optimizer(schedule, weight_decay=c.weight_decay, b1=c.b1,
                                          b2=c.b2)


  def flops_per_example(self) -> float:
    return metrics.train_flops_per_image(self.model)

  def features(self, params: Params, model_state: ModelState, images: jax.Array,
               pool: str = "cls") -> jax.Array:
    return features(params["encoder"], images, self.model, pool)
