"""The fine-tuning classifier of the reference (models_vit.py) on MAE's encoder.

The encoder's blocks with trained position embeddings and drop path, then by default
('avg', the reference's `global_pool`) the mean of the patch tokens through `fc_norm` (the
encoder's final norm is then absent), or ('cls') the cls token after the final norm; then a
linear head. Params: {'encoder': MAE's encoder names + 'pos_embed', 'fc_norm' (avg only),
'head'}, so a pretrained encoder drops in and official fine-tuned checkpoints map one to one.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.config import ViTConfig
from mae_jax.models import Encoder
from mae_jax.patches import patchify

Params = dict[str, Any]
POOLS = ("avg", "cls")
# trunc_normal_(std=2e-5) cuts at +-2 absolute, 1e5 std: a plain normal.
head_init = nn.initializers.normal(stddev=2e-5)


class Classifier(nn.Module):
  """[B, H, W, C] normalised images -> [B, num_classes] float32 logits."""
  config: ViTConfig
  num_classes: int
  pool: str = "avg"
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    patches = patchify(images.astype(jnp.float32), cfg.patch_size)  # [B, N, p*p*C]
    b, n, _ = patches.shape
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    x = Encoder(cfg, final_norm=self.pool == "cls", learned_pos=True,
                drop_path=self.drop_path, name="encoder")(
                    patches, positions, deterministic=deterministic)  # [B, 1 + N, D]
    if self.pool == "avg":
      x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="fc_norm")(
          x[:, 1:].mean(axis=1))  # [B, D]
    else:
      x = x[:, 0]
    return nn.Dense(self.num_classes, kernel_init=head_init, dtype=dtype,
                    name="head")(x).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def init_classifier(model: Classifier, rng: jax.Array) -> Params:
  cfg = model.config
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels))
  return model.init(rng, images)["params"]


def _bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """[out, in] weights of PyTorch's bicubic interpolation (align_corners=False, A=-0.75,
  edge pixels repeated), so that resizing is `W @ x` along one axis."""
  def near(t):  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1

  def far(t):  # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

  out = np.zeros((size_out, size_in))
  for i in range(size_out):
    real = (i + 0.5) * size_in / size_out - 0.5
    j = int(np.floor(real))
    t = real - j
    for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      out[i, min(max(j + offset, 0), size_in - 1)] += w
  return out


def interpolate_pos_embed(table: np.ndarray, grid: int, extra_tokens: int = 1) -> np.ndarray:
  """[1, extra + g*g, D] position embeddings -> [1, extra + grid*grid, D], as the reference's
  `interpolate_pos_embed`: the extra (cls) rows kept, the g x g grid resized bicubically."""
  table = np.asarray(table)
  extra, tokens = table[:, :extra_tokens], table[0, extra_tokens:]
  g = int(round(tokens.shape[0] ** 0.5))
  if g * g != tokens.shape[0]:
    raise ValueError(f"position embeddings of {tokens.shape[0]} patches are not a square grid")
  if g == grid:
    return table
  w = _bicubic_matrix(g, grid)  # [grid, g]
  x = tokens.reshape(g, g, -1).astype(np.float64)
  x = np.einsum("ij,jkd,lk->ild", w, x, w).reshape(1, grid * grid, -1)
  return np.concatenate([extra, x.astype(table.dtype)], axis=1)


def layer_id(path: str, depth: int) -> int:
  """The reference's get_layer_id_for_vit on a params path ('encoder/blocks_3/...'): patch
  embedding, cls token and position embeddings 0, block i -> i + 1, the rest depth + 1."""
  m = re.match(r"encoder/blocks_(\d+)/", path)
  if m:
    return int(m[1]) + 1
  if path.startswith(("encoder/patch_embed/", "encoder/cls_token", "encoder/pos_embed")):
    return 0
  return depth + 1


def tree_paths(params: Params) -> Params:
  """The same tree with each leaf replaced by its 'a/b/c' path."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "/".join(str(getattr(k, "key", k)) for k in p), params)
