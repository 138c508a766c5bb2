"""The linear probe's head (main_linprobe.py): BatchNorm1d(affine=False, eps 1e-6) + Linear.

At evaluation the BatchNorm is a fixed affine map of the running statistics, so the head is one
Linear: `fold` gives it, for exporting a probe as an ordinary classifier.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-6
BN_MOMENTUM = 0.1  # PyTorch's: running = (1 - 0.1) * running + 0.1 * batch statistic

Params = dict[str, Any]


def logits(x: jax.Array, head: Params, stats: Params) -> jax.Array:
  """[B, D] features -> [B, C] logits with the running statistics (evaluation)."""
  x = (x - stats["mean"]) * jax.lax.rsqrt(stats["var"] + BN_EPS)
  return x @ head["kernel"] + head["bias"]


def fold(head: Params, stats: Params) -> Params:
  """The head as one Linear {'kernel' [D, C], 'bias' [C]}: with s = 1 / sqrt(var + eps),
  ((x - mean) * s) @ W + b = x @ (s[:, None] * W) + (b - (mean * s) @ W). In float64, then
  float32."""
  kernel, bias = (np.asarray(head[k], np.float64) for k in ("kernel", "bias"))
  mean, var = (np.asarray(stats[k], np.float64) for k in ("mean", "var"))
  scale = 1 / np.sqrt(var + np.float64(np.float32(BN_EPS)))
  return {"kernel": jnp.asarray(scale[:, None] * kernel, jnp.float32),
          "bias": jnp.asarray(bias - (mean * scale) @ kernel, jnp.float32)}
