"""MAE reconstruction loss: mean squared error on removed patches only."""
import jax
import jax.numpy as jnp


def normalize_patches(target: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Per-patch normalisation of `norm_pix_loss`: (t - mean) / sqrt(unbiased var + eps)."""
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + eps)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over pixels of each patch, then average over patches where mask == 1.

  pred, target: [B, N, P]; mask: [B, N] with 1 = removed. Computed in float32.
  """
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)  # [B, N]
  # With mask_ratio 0 nothing is removed: the loss is 0 rather than 0/0.
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)
