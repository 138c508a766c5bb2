"""Linear probing, the reference recipe (main_linprobe.py).

A frozen encoder gives features (the cls token after the final norm, or with `pool='avg'`
the normalised mean of the patch tokens); the head is BatchNorm without affine parameters
(eps 1e-6, statistics over the global batch) and a linear layer, trained with LARS. The
encoder is carried in the model state: no gradients flow into it and it has no optimizer
state. `KnnTask`: the same frozen features, evaluated by kNN only (`configs/knn.py`).
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mae_jax import linear_head, optim
from mae_jax.config import COMPUTE_FIELDS, ENCODER_FIELDS, ViTConfig
from mae_jax.data import sources
from mae_jax.linear_head import BN_EPS, BN_MOMENTUM
from mae_jax.mae import POOLS, Params, features, init_encoder_params
from mae_jax.tasks.base import Aux, Batch, ModelState, Task, field_diff

HEAD_STD = 0.01  # trunc_normal_(std=0.01) cuts at +-2 absolute, 200 std: a plain normal

RANDOM = "random"  # init_from value for the baseline: the encoder at its random init


def vit_config_from(config: ml_collections.ConfigDict) -> ViTConfig:
  """`config.model` (the ViTConfig fields) -> the frozen encoder config, checked."""
  fields = config.model.to_dict()
  unknown = sorted(set(fields) - set(ENCODER_FIELDS))
  if unknown:
    raise ValueError(f"config.model has field(s) {unknown} that an encoder does not have; "
                     f"fields: {', '.join(ENCODER_FIELDS)}")
  return ViTConfig(**fields)


class LinearProbeTask(Task):
  """`config.model`: the encoder (ViTConfig fields); `config.num_classes`, `config.pool`."""

  name = "linear_probe"
  title = "linear probe"  # in messages
  batch_keys = ("image", "label")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.encoder = vit_config_from(config)
    self.num_classes = config.num_classes
    self.pool = config.pool
    self._class_names: list[str] | None = None  # the training data's, once it is read
    if self.pool not in POOLS:
      raise ValueError(f"config.pool must be one of {POOLS}, got {self.pool!r}")
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
        or self.num_classes < 2:
      raise ValueError(f"config.num_classes must be an int >= 2, got {self.num_classes!r}")
    if not config.get("init_from"):
      raise ValueError(f"a {self.title} needs config.init_from: the pretrained encoder (an "
                       "mae_jax workdir or params checkpoint, an official .pth, a Hugging "
                       f"Face directory), or {RANDOM!r} for the random-weights baseline")

  @property
  def image_size(self) -> int:
    return self.encoder.image_size

  def model_dict(self) -> dict[str, Any]:
    return {**self.encoder.to_dict(), "num_classes": self.num_classes, "pool": self.pool}

  def init(self, rng: jax.Array) -> tuple[Params, ModelState]:
    enc_rng, head_rng = jax.random.split(rng)
    d = self.encoder.width
    head = {"kernel": HEAD_STD * jax.random.normal(head_rng, (d, self.num_classes)),
            "bias": jnp.zeros((self.num_classes,))}  # [D, C], [C]
    batch_stats = {"mean": jnp.zeros((d,)), "var": jnp.ones((d,))}
    return {"head": head}, {"encoder": init_encoder_params(self.encoder, enc_rng),
                            "batch_stats": batch_stats}

  def load_init(self, path: str) -> Params | None:
    """The pretrained encoder's params, checked against `config.model` (COMPUTE_FIELDS and
    the image size may differ: the position embeddings are fixed sin-cos)."""
    if path == RANDOM:
      logging.getLogger(__name__).warning("%s of a RANDOMLY initialised encoder "
                                          "(init_from=%r): a baseline", self.title, RANDOM)
      return None
    from mae_jax.weights import read  # the file readers, only when asked for
    # What a .pth cannot say (its head count) is the config's.
    loaded = read.read(path, num_heads=self.encoder.num_heads)
    if loaded.kind != "mae":
      raise ValueError(f"init_from {path} is a fine-tuned classifier, not a pretrained MAE: a "
                       "linear probe starts from an MAE's encoder")
    diff = field_diff(loaded.config.encoder.to_dict(), self.encoder.to_dict(),
                      free=(*COMPUTE_FIELDS, "image_size"))
    if diff:
      raise ValueError(f"init_from {path} holds another encoder than config.model; "
                       f"(checkpoint, config): {diff}")
    return loaded.params["encoder"]

  def apply_init(self, loaded: Params, params: Params, model_state: ModelState
                 ) -> tuple[Params, ModelState]:
    return params, {**model_state, "encoder": loaded}

  def train_source(self):
    source = super().train_source()
    sources.check_num_classes(self.num_classes, source, f"split {self.config.input.split!r}")
    self._class_names = sources.class_names(source)
    return source

  def class_names(self) -> list[str] | None:
    return self._class_names

  def _features(self, model_state: ModelState, images: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(features(model_state["encoder"], images, self.encoder,
                                          self.pool).astype(jnp.float32))  # [B, D]

  def loss_fn(self, params: Params, model_state: ModelState, batch: Batch, rng: jax.Array
              ) -> tuple[jax.Array, Aux]:
    del rng
    x = self._features(model_state, batch["image"])
    n = x.shape[0]
    mean, var = x.mean(0), x.var(0)  # over the global batch (XLA reduces across devices)
    logits = ((x - mean) * jax.lax.rsqrt(var + BN_EPS)) @ params["head"]["kernel"] \
        + params["head"]["bias"]  # [B, C]
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    stats = model_state["batch_stats"]
    stats = {"mean": (1 - BN_MOMENTUM) * stats["mean"] + BN_MOMENTUM * mean,
             "var": (1 - BN_MOMENTUM) * stats["var"] + BN_MOMENTUM * var * n / (n - 1)}
    accuracy = (logits.argmax(-1) == labels).mean()
    return loss, Aux({"accuracy": accuracy}, {**model_state, "batch_stats": stats})

  def logits(self, params: Params, model_state: ModelState, images: jax.Array) -> jax.Array:
    return linear_head.logits(self._features(model_state, images), params["head"],
                              model_state["batch_stats"])

  def features(self, params: Params, model_state: ModelState, images: jax.Array,
               pool: str | None = None) -> jax.Array:
    return features(model_state["encoder"], images, self.encoder, pool or self.pool)

  def optimizer(self, peak_lr: float, warmup_steps: int, total_steps: int
                ) -> tuple[optax.Schedule, optax.GradientTransformation]:
    schedule = optim.lr_schedule(peak_lr, warmup_steps, total_steps)
    c = self.config
    return schedule, optim.lars(schedule, momentum=c.momentum,
                                trust_coefficient=c.trust_coefficient,
                                weight_decay=c.weight_decay)


class KnnTask(LinearProbeTask):
  """kNN accuracy of the frozen encoder (`configs/knn.py`): the linear probe's model and
  data, only evaluated (`config.eval_only`, with a `knn` evaluator), and named as what it is."""

  name = "knn"
  title = "kNN"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if not config.get("eval_only"):
      raise ValueError("task 'knn' trains nothing: it needs config.eval_only=True "
                       "(configs/knn.py); to train a head, task 'linear_probe'")
