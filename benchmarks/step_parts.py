"""Parts of the MAE step, as shipped and as alternatives, timed beside the whole train step.

  python benchmarks/step_parts.py [--variant B/16] [--batch 8] [--repeats 15]

Each part at the variant's shapes, forward and backward (the step differentiates them all):
  * MAE's two index operations: the masking gather (the visible 25% of the encoder's patch
    tokens, [B, N, D] -> [B, L, D]) and the decoder's unshuffle (visible and mask tokens back
    into patch order, [B, N, Dd] -> [B, N, Dd]), as shipped (take_along_axis) and as one-hot
    matmuls, the form some backends run faster than a gather, at B * K * N * D multiply-adds
    instead of B * K * D copies;
  * one encoder attention layer ([B, 1 + L, D], qkv projection to output projection): as
    shipped (one [D, 3D] matmul, reshaped and split into q, k, v as [B, N, H, Dh]), with the
    projection written to give [3, B, N, H, Dh] so the split takes leading slices, and with
    heads-major [3, B, H, N, Dh] feeding attention as einsums over [B, H, N, N] scores.
Rows are timed round-robin, each round starting one row later; the whole shipped step
(benchmarks/mae_step.py's) gives the share of the step each part takes.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import models
from mae_jax.config import model_config
from mae_jax.masking import num_kept, random_masking
from mae_step import jax_step


def take(x: jax.Array, ids: jax.Array) -> jax.Array:
  """[B, N, D], [B, K] -> [B, K, D], as mae_jax does it."""
  return jnp.take_along_axis(x, ids[..., None], axis=1)


def one_hot(x: jax.Array, ids: jax.Array) -> jax.Array:
  """The same rows as `take`, picked by a [B, K, N] one-hot matmul."""
  return jnp.einsum("bkn,bnd->bkd", jax.nn.one_hot(ids, x.shape[1], dtype=x.dtype), x)


def index_ops(gather: Callable, config, batch: int) -> Callable[[], None]:
  """Forward + backward of the masking gather and the unshuffle, compiled before returning."""
  n, keep = config.num_patches, num_kept(config.num_patches, config.mask_ratio)
  rng = jax.random.split(jax.random.key(0), 3)
  tokens = jax.random.normal(rng[0], (batch, n, config.width))  # [B, N, D]
  decoded = jax.random.normal(rng[1], (batch, keep, config.decoder_width))  # [B, L, Dd]
  mask_token = jnp.zeros((1, 1, config.decoder_width))
  masking = random_masking(tokens, config.mask_ratio, rng=rng[2])  # the model's own indices
  ids_keep, ids_restore = masking.ids_keep, masking.ids_restore

  def loss(tokens, decoded, mask_token):
    kept = gather(tokens, ids_keep)  # [B, L, D]
    filler = jnp.broadcast_to(mask_token, (batch, n - keep, config.decoder_width))
    unshuffled = gather(jnp.concatenate([decoded, filler], axis=1), ids_restore)  # [B, N, Dd]
    return jnp.sum(kept**2) + jnp.sum(unshuffled**2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  jax.block_until_ready(grad(tokens, decoded, mask_token))
  return lambda: jax.block_until_ready(grad(tokens, decoded, mask_token))


def qkv_shipped(x, kernel, bias, heads):
  """As models.Attention: [B, N, D] @ [D, 3D], reshaped, split: 3 x [B, N, H, Dh]."""
  b, n, d = x.shape
  qkv = (x @ kernel + bias).reshape(b, n, 3, heads, d // heads)
  return models.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, N, H, Dh]


def qkv_leading(x, kernel, bias, heads):
  """The projection written to put q, k, v on the leading axis: [3, B, N, H, Dh]."""
  b, n, d = x.shape
  w = kernel.reshape(d, 3, heads, d // heads)
  qkv = jnp.einsum("bnd,dthk->tbnhk", x, w) + bias.reshape(3, 1, 1, heads, d // heads)
  return models.attend(qkv[0], qkv[1], qkv[2])


def qkv_heads_major(x, kernel, bias, heads):
  """Heads-major [3, B, H, N, Dh], attention as einsums, back to [B, N, H, Dh]."""
  b, n, d = x.shape
  w = kernel.reshape(d, 3, heads, d // heads)
  q, k, v = jnp.einsum("bnd,dthk->tbhnk", x, w) + bias.reshape(3, 1, heads, 1, d // heads)
  scores = jnp.einsum("bhqk,bhnk->bhqn", q, k) / np.sqrt(d // heads).astype(x.dtype)
  return jnp.einsum("bhqn,bhnk->bqhk", jax.nn.softmax(scores, axis=-1), v)  # [B, N, H, Dh]


def attention_layer(qkv: Callable, config, batch: int) -> Callable[[], None]:
  """Forward + backward of one encoder attention layer, compiled before returning."""
  d, heads = config.width, config.num_heads
  n = 1 + num_kept(config.num_patches, config.mask_ratio)
  rng = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(rng[0], (batch, n, d))  # [B, 1 + L, D]
  params = (0.02 * jax.random.normal(rng[1], (d, 3 * d)), jnp.zeros((3 * d,)),
            0.02 * jax.random.normal(rng[2], (d, d)))

  def loss(x, params):
    kernel, bias, proj = params
    out = qkv(x, kernel, bias, heads).reshape(batch, n, d) @ proj  # [B, N, D]
    return jnp.sum(out**2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(grad(x, params))
  return lambda: jax.block_until_ready(grad(x, params))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  config = model_config(args.variant, dtype="float32")
  # The alternatives compute the same values as the shipped forms.
  x = jax.random.normal(jax.random.key(2), (2, 17, 3 * config.num_heads))
  kernel = 0.1 * jax.random.normal(jax.random.key(3), (x.shape[-1], 3 * x.shape[-1]))
  bias = 0.1 * jax.random.normal(jax.random.key(4), (3 * x.shape[-1],))
  ids = jnp.argsort(jax.random.uniform(jax.random.key(5), (2, 17)), axis=1)[:, :5]
  np.testing.assert_allclose(one_hot(x, ids), take(x, ids), atol=1e-6)
  for qkv in (qkv_leading, qkv_heads_major):
    np.testing.assert_allclose(qkv(x, kernel, bias, config.num_heads),
                               qkv_shipped(x, kernel, bias, config.num_heads), atol=1e-5)
  rows = {"index ops, take_along_axis (shipped)": index_ops(take, config, args.batch),
          "index ops, one-hot matmuls": index_ops(one_hot, config, args.batch),
          "attention layer, shipped": attention_layer(qkv_shipped, config, args.batch),
          "attention layer, qkv leading": attention_layer(qkv_leading, config, args.batch),
          "attention layer, heads-major": attention_layer(qkv_heads_major, config,
                                                          args.batch)}
  step = jax_step(config, args.batch)
  step_times, times = [], {name: [] for name in rows}
  names = list(rows)
  for r in range(args.repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      for _ in range(10):  # one call is ~1 ms: ten per timing
        rows[name]()
      times[name].append((time.perf_counter() - start) / 10)
    if r % 5 == 0:  # a step takes seconds on a CPU: a few suffice
      start = time.perf_counter()
      step()
      step_times.append(time.perf_counter() - start)
  step_time = np.median(step_times)
  print(f"{args.variant}, batch {args.batch}, float32, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} cpus; whole train step {step_time * 1e3:.0f} ms "
        f"(median of {len(step_times)})")
  for name, t in times.items():
    print(f"  {name:38s} {np.median(t) * 1e3:8.2f} ms forward + backward = "
          f"{np.median(t) / step_time:6.2%} of the step")


if __name__ == "__main__":
  main()
