"""The paper's optimiser: AdamW (0.9, 0.95), lr = base_lr * batch / 256, warmup + cosine."""
from __future__ import annotations

import jax
import optax


def learning_rate(base_lr: float, batch_size: int) -> float:
  """The linear scaling rule of MAE: absolute lr = base lr * effective batch / 256."""
  return base_lr * batch_size / 256


def lr_schedule(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Per-step linear warmup from 0 to `peak_lr`, then half-cosine to 0 at `total_steps`.

  The reference sets the lr every iteration from the fractional epoch; counting in
  optimizer steps gives the same curve.
  """
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps ({warmup_steps}) must be in [0, total_steps "
                     f"({total_steps}))")
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, 0.0)


def weight_decay_mask(params):
  """True where weight decay applies: every parameter with 2+ dims.

  As the reference (timm's add_weight_decay): Linear weights and the cls / mask tokens
  decay; biases and LayerNorm scales and offsets (1-D) do not. Position embeddings are
  fixed constants, not parameters, so they are never touched.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float, b1: float, b2: float
                   ) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=weight_decay_mask)
