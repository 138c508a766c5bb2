"""Cutting images into non-overlapping patches and back (pure functions).

A patch vector is ordered (row, column, channel), the order of the reference's
`nchpwq->nhwpqc`, so pixel targets and patch-embedding weights line up with its checkpoints.
"""
import jax


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, p*p*C] with N = (H/p)*(W/p) in row-major grid order."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
  x = images.reshape(b, h // p, p, w // p, p, c)  # [B, gh, p, gw, p, C]
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, gw, p, p, C]
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid_hw: tuple[int, int] | None = None
               ) -> jax.Array:
  """[B, N, p*p*C] -> [B, H, W, C]; the exact inverse of `patchify`.

  `grid_hw` is the (rows, columns) patch grid; square when omitted.
  """
  b, n, d = patches.shape
  p = patch_size
  if grid_hw is None:
    g = int(round(n ** 0.5))
    grid_hw = (g, g)
  gh, gw = grid_hw
  if gh * gw != n or d % (p * p):
    raise ValueError(f"cannot unpatchify {patches.shape} with patch size {p} "
                     f"into a {gh}x{gw} grid")
  c = d // (p * p)
  x = patches.reshape(b, gh, gw, p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, p, gw, p, C]
  return x.reshape(b, gh * p, gw * p, c)
