"""The recipes' optimisers: AdamW (pretraining), LARS (linear probe), AdamW with layer-wise
lr decay (fine-tuning); lr = base_lr * batch / 256, per-step warmup then cosine."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate(base_lr: float, batch_size: int) -> float:
  """The linear scaling rule of MAE: absolute lr = base lr * effective batch / 256."""
  return base_lr * batch_size / 256


def lr_schedule(peak_lr: float, warmup_steps: int, total_steps: int, end_value: float = 0.0
                ) -> optax.Schedule:
  """Per-step linear warmup from 0 to `peak_lr`, then half-cosine to `end_value` (the
  fine-tuning recipe's min_lr) at `total_steps`.

  The reference sets the lr every iteration from the fractional epoch; counting in
  optimizer steps gives the same curve.
  """
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps ({warmup_steps}) must be in [0, total_steps "
                     f"({total_steps}))")
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, end_value)


def weight_decay_mask(params):
  """True where weight decay applies: every parameter with 2+ dims.

  As the reference (timm's add_weight_decay): Linear weights and the cls / mask tokens
  decay; biases and LayerNorm scales and offsets (1-D) do not. Position embeddings are
  fixed constants, not parameters, so they are never touched.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float, b1: float, b2: float,
                   mu_dtype: str | None = None) -> optax.GradientTransformation:
  """The recipe's AdamW; `mu_dtype` stores the first moment in another dtype (None: the
  parameters' float32; benchmarks/gpu.py times 'bfloat16')."""
  return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=weight_decay_mask,
                     mu_dtype=mu_dtype)


def lars_direction(weight_decay: float, trust_coefficient: float
                   ) -> optax.GradientTransformation:
  """The reference LARS's per-parameter direction (main_linprobe.py's util/lars.py).

  For parameters with 2+ dims: d = g + wd * p, scaled by trust * |p| / |d| (by 1 where
  either norm is 0). 1-D parameters (biases, norms) keep their gradient: neither weight
  decay nor trust scaling.
  """
  def update(grads, state, params):
    def direction(g, p):
      if p.ndim <= 1:
        return g
      d = g + weight_decay * p
      p_norm, d_norm = jnp.linalg.norm(p), jnp.linalg.norm(d)
      ratio = jnp.where((p_norm > 0) & (d_norm > 0), trust_coefficient * p_norm / d_norm, 1.0)
      return d * ratio
    return jax.tree.map(direction, grads, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def lars(schedule: optax.Schedule, *, momentum: float = 0.9, trust_coefficient: float = 0.001,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """LARS as the reference applies it: mu = momentum * mu + d; p -= lr * mu.

  The lr multiplies the momentum buffer (optax.lars applies it before its momentum trace,
  which differs whenever the lr changes, i.e. during warmup and cosine decay).
  """
  return optax.chain(lars_direction(weight_decay, trust_coefficient), optax.trace(momentum),
                     optax.scale_by_learning_rate(schedule))


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by its own constant (a pytree of floats like the params)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, c: u * c, updates, scales), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adamw_layer_decay(schedule: optax.Schedule, *, weight_decay: float, b1: float, b2: float,
                      decay_mask, lr_scales) -> optax.GradientTransformation:
  """AdamW where parameter p's lr is `schedule * lr_scales[p]` (layer-wise lr decay).

  As PyTorch's AdamW on the reference's parameter groups: the group lr multiplies the
  decoupled weight decay as well as the Adam step; decay only where `decay_mask` is True.
  """
  return optax.chain(optax.scale_by_adam(b1, b2, eps=1e-8),
                     optax.add_decayed_weights(weight_decay, decay_mask),
                     optax.scale_by_learning_rate(schedule), scale_by_tree(lr_scales))
