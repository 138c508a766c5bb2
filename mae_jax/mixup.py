"""Mixup / CutMix on a batch with smoothed soft targets, as timm's `Mixup` (mode 'batch').

One draw per batch: with probability `prob` the batch is mixed with itself reversed, by
CutMix (probability `switch_prob` when both are on) or Mixup, lam ~ Beta(alpha, alpha).
CutMix labels are mixed by the area actually pasted (the box is clipped at the border).
Pure jax from one rng: the same step gives the same batch, so resume stays exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """[B] int -> [B, C]: 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere."""
  return jax.nn.one_hot(labels, num_classes) * (1 - smoothing) + smoothing / num_classes


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int
               ) -> tuple[jax.Array, jax.Array]:
  """A box of area ~(1 - lam) centred uniformly, clipped at the border (timm's rand_bbox).

  Returns its [H, W] bool mask and the area fraction kept outside it (the corrected lam).
  """
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy, cx = jax.random.randint(ky, (), 0, height), jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
  return mask, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
              mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
              smoothing: float) -> tuple[jax.Array, jax.Array]:
  """[B, H, W, C] images, [B] labels -> (mixed images, [B, num_classes] soft targets)."""
  targets = smooth_one_hot(labels, num_classes, smoothing)  # [B, C]
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  other = images[::-1]  # the batch reversed, as timm's mix_batch
  box, lam_box = cutmix_box(k_box, lam_cut, images.shape[1], images.shape[2])
  cutmixed = jnp.where(box[None, :, :, None], other, images)
  mixed = images * lam_mix + other * (1 - lam_mix)
  images = jnp.where(apply, jnp.where(use_cutmix, cutmixed, mixed), images)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  return images, lam * targets + (1 - lam) * targets[::-1]
