"""Per-example random masking by sorting noise (pure function, explicit noise or rng)."""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Masking(NamedTuple):
  kept: jax.Array  # [B, L, ...] the visible tokens, in shuffled order
  mask: jax.Array  # [B, N] float, 1 = removed, 0 = kept, in original patch order
  ids_keep: jax.Array  # [B, L] int32 original positions of the kept tokens
  ids_restore: jax.Array  # [B, N] int32, undoes the shuffle: shuffled[ids_restore] = original


def num_kept(num_tokens: int, mask_ratio: float) -> int:
  """The reference's rule: int(N * (1 - mask_ratio)) tokens stay visible."""
  return int(num_tokens * (1 - mask_ratio))


def random_masking(tokens: jax.Array, mask_ratio: float, *, noise: jax.Array | None = None,
                   rng: jax.Array | None = None) -> Masking:
  """Keeps the tokens with the smallest noise, `int(N * (1 - mask_ratio))` per example.

  tokens: [B, N, ...]. Exactly one of `noise` ([B, N], any float) or `rng` must be given;
  with `rng` the noise is uniform in [0, 1), so each example gets its own permutation.
  Given the same noise, the kept set is `argsort(noise)[:, :L]`, as in the reference.
  """
  b, n = tokens.shape[:2]
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
  if (noise is None) == (rng is None):
    raise ValueError("give exactly one of noise or rng")
  if noise is None:
    noise = jax.random.uniform(rng, (b, n))
  elif noise.shape != (b, n):
    raise ValueError(f"noise must have shape [B, N] = {(b, n)}, got {tuple(noise.shape)}")
  keep = num_kept(n, mask_ratio)
  if keep < 1:
    raise ValueError(f"mask_ratio {mask_ratio} keeps no token out of {n}")

  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)  # ascending: small noise is kept
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  ids_keep = ids_shuffle[:, :keep]  # [B, L]
  kept = jnp.take_along_axis(tokens, ids_keep.reshape(b, keep, *([1] * (tokens.ndim - 2))),
                             axis=1)
  # Mask in shuffled order is [0]*L + [1]*(N-L); unshuffle it into patch order.
  mask = (ids_restore >= keep).astype(jnp.float32)  # [B, N]
  return Masking(kept, mask, ids_keep, ids_restore)
