"""End-to-end fine-tuning, the reference recipe (main_finetune.py, util/lr_decay.py).

The classifier (`mae_jax.classifier`: global pool + fc_norm by default, drop path, trained
position embeddings) starts from a pretrained MAE encoder (`init_from`), or is read whole
from a fine-tuned checkpoint (an official `.pth`, a Hugging Face ViTForImageClassification)
to be evaluated. AdamW with layer-wise lr decay, warmup + cosine to `min_lr`, Mixup /
CutMix with label smoothing on the batch, drop path per micro-batch.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mae_jax import classifier, mixup, optim
from mae_jax.config import COMPUTE_FIELDS
from mae_jax.data import sources
from mae_jax.mae import Params
from mae_jax.posemb import sincos_2d
from mae_jax.tasks.base import Aux, Batch, ModelState, Task, field_diff
from mae_jax.tasks.linear_probe import RANDOM, vit_config_from

NO_WEIGHT_DECAY = ("encoder/cls_token", "encoder/pos_embed")  # besides every 1-D parameter


def lr_scales(paths: Params, depth: int, decay: float) -> Params:
  """Per-parameter lr scale decay^(depth + 1 - layer_id) (util/lr_decay.py)."""
  return jax.tree.map(lambda p: decay ** (depth + 1 - classifier.layer_id(p, depth)), paths)


def decay_mask(paths: Params, params: Params) -> Params:
  """True where weight decay applies: 2+ dims, except the cls token and position embeddings."""
  return jax.tree.map(lambda p, x: x.ndim > 1 and p not in NO_WEIGHT_DECAY, paths, params)


class FinetuneTask(Task):
  """`config.model`: the encoder (ViTConfig fields); `num_classes`, `pool`, `drop_path`."""

  name = "finetune"
  batch_keys = ("image", "label")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.encoder = vit_config_from(config)
    self.num_classes, self.pool = config.num_classes, config.pool
    self._class_names: list[str] | None = None  # the training data's, once it is read
    if self.pool not in classifier.POOLS:
      raise ValueError(f"config.pool must be one of {classifier.POOLS}, got {self.pool!r}")
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
        or self.num_classes < 2:
      raise ValueError(f"config.num_classes must be an int >= 2, got {self.num_classes!r}")
    if not 0 <= config.drop_path < 1:
      raise ValueError(f"config.drop_path must be in [0, 1), got {config.drop_path}")
    if not 0 < config.layer_decay <= 1:
      raise ValueError(f"config.layer_decay must be in (0, 1], got {config.layer_decay}")
    if not config.get("init_from"):
      raise ValueError("fine-tuning needs config.init_from: the pretrained encoder (an mae_jax "
                       "workdir or params checkpoint, an official .pth, a Hugging Face "
                       "directory), a fine-tuned classifier to evaluate, or "
                       f"{RANDOM!r} to train the same ViT from scratch")
    self.model = classifier.Classifier(self.encoder, self.num_classes, self.pool,
                                       config.drop_path)

  @property
  def image_size(self) -> int:
    return self.encoder.image_size

  def model_dict(self) -> dict[str, Any]:
    return {**self.encoder.to_dict(), "num_classes": self.num_classes, "pool": self.pool}

  def init(self, rng: jax.Array) -> tuple[Params, ModelState]:
    return classifier.init_classifier(self.model, rng), {}

  # --- init_from ---
  def load_init(self, path: str) -> tuple[str, Any] | None:
    """('classifier', params) from a fine-tuned classifier (an mae_jax fine-tuning checkpoint
    such as WORKDIR/best, an official .pth, a Hugging Face directory), or ('encoder', (params,
    ViTConfig)) from a pretrained MAE; checked against the config before anything is written.
    The image size may differ: position embeddings are resized to the config's grid."""
    if path == RANDOM:
      logging.getLogger(__name__).warning("fine-tuning a RANDOMLY initialised ViT "
                                          "(init_from=%r): training from scratch", RANDOM)
      return None
    from mae_jax.weights import read  # the file readers, only when asked for
    # What a .pth cannot say (heads, eps) is taken from the config.
    loaded = read.read(path, num_heads=self.encoder.num_heads,
                       layer_norm_eps=self.encoder.layer_norm_eps)
    free = (*COMPUTE_FIELDS, "image_size")
    if loaded.kind == "mae":
      diff = field_diff(loaded.config.encoder.to_dict(), self.encoder.to_dict(), free)
      if diff:
        raise ValueError(f"init_from {path} holds another encoder than config.model; "
                         f"(checkpoint, config): {diff}")
      return "encoder", (loaded.params["encoder"], loaded.config.encoder)
    if loaded.num_classes != self.num_classes:
      raise ValueError(f"init_from {path} classifies {loaded.num_classes} classes, "
                       f"config.num_classes is {self.num_classes}")
    if loaded.config.width != self.encoder.width:
      raise ValueError(f"init_from {path} holds another classifier than the config: width "
                       f"{loaded.config.width}, config.model.width {self.encoder.width}")
    if loaded.pool != self.pool:
      raise ValueError(f"init_from {path} is a classifier with pool {loaded.pool!r}, "
                       f"config.pool is {self.pool!r}")
    diff = field_diff(loaded.config.to_dict(), self.encoder.to_dict(), free)
    if diff:
      raise ValueError(f"init_from {path} holds another classifier than the config; "
                       f"(checkpoint, config): {diff}")
    # Its position embeddings resized to this grid, here on the host: `apply_init` runs
    # inside the jitted function that builds the state.
    encoder = loaded.params["encoder"]
    pos = classifier.interpolate_pos_embed(encoder["pos_embed"], self.encoder.grid_size)
    return "classifier", {**loaded.params, "encoder": {**encoder, "pos_embed": pos}}

  def apply_init(self, loaded: tuple[str, Any], params: Params, model_state: ModelState
                 ) -> tuple[Params, ModelState]:
    kind, value = loaded
    if kind == "classifier":  # as read, position embeddings already on this grid
      return value, model_state
    encoder, config = value
    # The pretrained encoder's fixed sin-cos table, resized to this grid: the start of the
    # trained position embeddings (as the reference loads and interpolates `pos_embed`).
    table = sincos_2d(config.width, config.grid_size, cls_token=True)[None]
    pos = classifier.interpolate_pos_embed(table, self.encoder.grid_size)
    new = {**params["encoder"], "pos_embed": jnp.asarray(pos)}
    new.update({k: v for k, v in encoder.items()
                if k != "norm" or self.pool == "cls"})  # global pool: fc_norm, no norm
    return {**params, "encoder": new}, model_state

  # --- data ---
  def train_source(self):
    source = super().train_source()
    sources.check_num_classes(self.num_classes, source, f"split {self.config.input.split!r}")
    self._class_names = sources.class_names(source)
    return source

  def class_names(self) -> list[str] | None:
    return self._class_names

  # --- loss ---
  def prepare_batch(self, batch: Batch, rng: jax.Array) -> Batch:
    c = self.config
    images, targets = mixup.mix_batch(
        rng, batch["image"], batch["label"], self.num_classes, mixup_alpha=c.mixup,
        cutmix_alpha=c.cutmix, prob=c.mixup_prob, switch_prob=c.mixup_switch_prob,
        smoothing=c.smoothing)
    return {**batch, "image": images, "target": targets}

  def loss_fn(self, params: Params, model_state: ModelState, batch: Batch, rng: jax.Array
              ) -> tuple[jax.Array, Aux]:
    logits = self.model.apply({"params": params}, batch["image"], deterministic=False,
                              rngs={"drop_path": rng})  # [B, C]
    loss = optax.softmax_cross_entropy(logits, batch["target"]).mean()  # soft targets
    return loss, Aux({}, model_state)

  def logits(self, params: Params, model_state: ModelState, images: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, images)

  # --- optimizer ---
  def optimizer(self, peak_lr: float, warmup_steps: int, total_steps: int
                ) -> tuple[optax.Schedule, optax.GradientTransformation]:
    c = self.config
    schedule = optim.lr_schedule(peak_lr, warmup_steps, total_steps, end_value=c.min_lr)
    abstract = jax.eval_shape(self.init, jax.random.key(0))[0]
    paths = classifier.tree_paths(abstract)
    return schedule, optim.adamw_layer_decay(
        schedule, weight_decay=c.weight_decay, b1=c.b1, b2=c.b2,
        decay_mask=decay_mask(paths, abstract),
        lr_scales=lr_scales(paths, self.encoder.depth, c.layer_decay))
