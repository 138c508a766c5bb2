"""Flax linen modules of MAE: a ViT encoder on visible patches and a lightweight decoder.

With dtype bfloat16, matmuls and LayerNorm outputs are bfloat16 while the residual stream
stays float32, as under the reference's mixed precision (autocast), where the float32
position-embedding add keeps the residual in float32.

Parameter names follow the reference (facebookresearch/mae) so checkpoints map one to one:
encoder {patch_embed, cls_token, blocks_i, norm}, decoder {decoder_embed, mask_token,
decoder_blocks_i, decoder_norm, decoder_pred}. Position embeddings are fixed sin-cos
constants, not parameters. Masking and rngs stay outside the modules.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.config import ModelConfig, ViTConfig
from mae_jax.posemb import sincos_2d

xavier = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), written as 0.5 * x * (1 + erf(x / sqrt(2))) like PyTorch's kernel.

  Same function as the reference's nn.GELU() (not the tanh approximation), but cheaper on
  XLA than jax.nn.gelu(approximate=False), whose erfc form costs an exp and two rational
  approximations per element (benchmarks/gelu.py). Computed in float32 (as PyTorch does for
  bfloat16 inputs): in bfloat16, 1 + erf(.) would round away the negative tail.
  """
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(np.sqrt(0.5))))).astype(x.dtype)


def attention_device() -> jax.Device:
  """The device attention is traced for: the default backend's first."""
  return jax.devices()[0]


def _cuda_capability(device: jax.Device) -> tuple[int, ...] | None:
  """(major, minor) of an NVIDIA GPU, None for any other device (ROCm names a gfx target)."""
  try:
    return tuple(int(x) for x in str(device.compute_capability).split("."))
  except (AttributeError, ValueError):
    return None


def attention_implementation(attention: str, dtype: jnp.dtype, device: jax.Device) -> str:
  """The kernel a config's `attention` setting ('auto', 'xla', 'cudnn') means for
  activations of `dtype` on `device`: 'xla' or 'cudnn'.

  'auto' is cuDNN's fused kernel on NVIDIA GPUs from Ampere on (compute capability 8.0, the
  oldest JAX's cuDNN attention supports) in bfloat16 (1.31x the ViT-B/16 train step of XLA's
  attention on an H200, BENCHMARKS.md), and XLA's everywhere else. 'cudnn' off a GPU is a
  ValueError naming the setting, raised before anything compiles.
  """
  if attention == "cudnn" and device.platform != "gpu":
    raise ValueError(f"model attention 'cudnn' needs a GPU, but JAX's device is "
                     f"{device.platform!r}: use attention 'auto' or 'xla'")
  if attention == "auto":
    capability = _cuda_capability(device) if device.platform == "gpu" else None
    fused = capability is not None and capability >= (8, 0)
    return "cudnn" if fused and jnp.dtype(dtype) == jnp.bfloat16 else "xla"
  return attention


def attend_even(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
  """`jax.nn.dot_product_attention` with an odd sequence length padded by one masked token.

  [B, N, H, Dh] each -> [B, N, H, Dh]. JAX (0.10.2 to 0.12.0.1 at least) refuses cuDNN's
  training kernel at odd lengths (the check counts the placeholder it passes for "no bias" as
  a bias), and MAE's decoder sees 1 + 196 tokens. The true lengths go in as query and key/value sequence
  lengths, so the pad takes part in no softmax, and its output row is dropped.
  """
  n = q.shape[1]
  if n % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))  # [B, N + 1, H, Dh]
  lengths = jnp.full((q.shape[0],), n, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :n]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, attention: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v per head: [B, N, H, Dh] each -> [B, N, H, Dh].

  `attention` is the config's setting (`attention_implementation`). XLA's form is
  jax.nn.dot_product_attention's; benchmarks/gpu.py times cuDNN's against it, and
  benchmarks/mae_step.py --levers other layouts on the CPU. With 'auto', a shape cuDNN
  refuses while tracing (e.g. too large a head dim) falls back to XLA's form.
  """
  implementation = attention_implementation(attention, q.dtype, attention_device())
  if implementation == "xla":
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  try:
    return attend_even(q, k, v, "cudnn")
  except (NotImplementedError, RuntimeError) as e:
    if attention != "auto":
      raise
    logging.getLogger(__name__).warning("cuDNN refuses attention of shape %s (%s): XLA's "
                                        "kernel computes it", q.shape, e)
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (bias on), as the reference."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  attention: str = "auto"  # the kernel (`attend`)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    h = self.num_heads
    # Initialising (and so every params-shape computation) takes XLA's kernel: the weights
    # are the same, and a config saved with 'cudnn' still loads where there is no GPU.
    attention = "xla" if self.is_initializing() else self.attention
    qkv = nn.Dense(3 * d, kernel_init=xavier, dtype=self.dtype, name="qkv")(x)  # [B, N, 3D]
    q, k, v = jnp.split(qkv.reshape(b, n, 3, h, d // h), 3, axis=2)  # 3 x [B, N, 1, H, Dh]
    out = attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], attention)  # [B, N, H, Dh]
    return nn.Dense(d, kernel_init=xavier, dtype=self.dtype, name="proj")(out.reshape(b, n, d))


class Mlp(nn.Module):
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(self.hidden_dim, kernel_init=xavier, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(d, kernel_init=xavier, dtype=self.dtype, name="fc2")(gelu(x))


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth on a residual branch: each sample's [B, ...] row is zeroed with
  probability `rate`, kept rows are scaled by 1 / (1 - rate) (timm's DropPath)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  With `drop_path` > 0 and `deterministic=False`, each branch goes through `drop_path`
  (rngs 'drop_path'); the default is the MAE block, which has none.
  """
  num_heads: int
  mlp_dim: int
  eps: float
  dtype: jnp.dtype = jnp.float32
  drop_path: float = 0.0
  attention: str = "auto"  # the kernel (`attend`)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    norm = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name=name)

    def branch(y):
      if deterministic or self.drop_path == 0:
        return y
      return drop_path(y, self.drop_path, self.make_rng("drop_path"))
    attn = Attention(self.num_heads, self.dtype, self.attention, name="attn")
    x = x + branch(attn(norm("norm1")(x)))
    return x + branch(Mlp(self.mlp_dim, self.dtype, name="mlp")(norm("norm2")(x)))


class Encoder(nn.Module):
  """ViT encoder over a subset of patches (plus a cls token), ending with LayerNorm.

  patches: [B, L, p*p*C] (already patchified); positions: [B, L] int, the grid index of
  each patch, used to pick its fixed position embedding. With `mask_tokens` (the paper's
  ablation `encoder_mask_tokens`), patches where `mask` ([B, N]) is 1 are replaced by a
  learned token. Returns [B, 1 + L, D].

  The fine-tuned classifier sets `learned_pos` (a trained `pos_embed` [1, 1 + N, D],
  initialised to the sin-cos table with a zero cls row, the cls token gets its row) and
  `drop_path` (rates rising linearly from 0 at the first block to `drop_path` at the last).
  The defaults are MAE's encoder.
  """
  config: ViTConfig
  mask_tokens: bool = False
  final_norm: bool = True  # False: the last block's output (for pooled features)
  learned_pos: bool = False
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, patches: jax.Array, positions: jax.Array,
               mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if self.learned_pos:
      table = self.param("pos_embed", lambda _: jnp.asarray(
          sincos_2d(cfg.width, cfg.grid_size, cls_token=True))[None])  # [1, 1 + N, D]
      pos, cls_pos = table[0, 1:], table[:, :1]
    else:
      pos, cls_pos = jnp.asarray(sincos_2d(cfg.width, cfg.grid_size)), None  # [N, D]
    x = nn.Dense(cfg.width, kernel_init=xavier, dtype=dtype, name="patch_embed")(patches)
    x = x.astype(jnp.float32) + pos[positions]  # [B, L, D] float32 residual stream
    if self.mask_tokens:
      if mask is None:
        raise ValueError("encoder_mask_tokens needs the mask")
      token = self.param("mask_token", token_init, (1, 1, cfg.width))
      x = jnp.where(mask[..., None] > 0, token + pos[positions], x)
    cls = self.param("cls_token", token_init, (1, 1, cfg.width))  # fixed position: 0
    if cls_pos is not None:
      cls = cls + cls_pos
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.width)), x],
                        axis=1)  # [B, 1 + L, D]
    rates = np.linspace(0, self.drop_path, cfg.depth)
    for i in range(cfg.depth):
      x = Block(cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps, dtype, float(rates[i]),
                cfg.attention, name=f"blocks_{i}")(x, deterministic)
    if not self.final_norm:
      return x
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="norm")(x)


class Decoder(nn.Module):
  """Lightweight decoder: mask tokens at removed positions, unshuffle, predict pixels.

  latent: [B, 1 + L, D] encoder output; ids_restore: [B, N] from the masking, or None when
  the encoder already saw every position (`encoder_mask_tokens`). Returns [B, N, p*p*C].
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array | None) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dw = cfg.decoder_width
    x = nn.Dense(dw, kernel_init=xavier, dtype=dtype, name="decoder_embed")(latent)
    x = x.astype(jnp.float32)  # float32 residual stream
    if ids_restore is not None:
      token = self.param("mask_token", token_init, (1, 1, dw))
      b, n = ids_restore.shape
      visible = x[:, 1:]  # [B, L, Dd] in shuffled order
      tokens = jnp.broadcast_to(token, (b, n - visible.shape[1], dw))
      shuffled = jnp.concatenate([visible, tokens], axis=1)  # [B, N, Dd]
      unshuffled = jnp.take_along_axis(shuffled, ids_restore[..., None], axis=1)
      x = jnp.concatenate([x[:, :1], unshuffled], axis=1)  # [B, 1 + N, Dd]
    pos = sincos_2d(dw, cfg.grid_size, cls_token=True)  # [1 + N, Dd]
    x = x + jnp.asarray(pos)
    for i in range(cfg.decoder_depth):
      x = Block(cfg.decoder_num_heads, cfg.decoder_mlp_dim, cfg.layer_norm_eps, dtype,
                attention=cfg.attention, name=f"decoder_blocks_{i}")(x)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="decoder_norm")(x)
    x = nn.Dense(cfg.patch_dim, kernel_init=xavier, dtype=dtype, name="decoder_pred")(x)
    return x[:, 1:]  # drop the cls position: [B, N, p*p*C]
