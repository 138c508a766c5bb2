"""Fixed 2D sin-cos position embeddings, as in MAE (computed in float64, then cast)."""
import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[M] positions -> [M, dim]: sin of the first dim/2 frequencies, then cos."""
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000 ** omega  # [dim/2]
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
  """[N (+1), dim] embeddings of a square grid in row-major order.

  The first half of the channels encodes the column, the second half the row (the
  reference's meshgrid(w, h) order). With `cls_token`, a zero row comes first.
  """
  if dim % 4:
    raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)
