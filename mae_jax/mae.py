"""The MAE forward pass as pure functions: `init_params`, `mae_apply`, `encode`.

Data flow: images -> patchify -> random masking (explicit noise or rng) -> encoder on the
visible patches -> decoder with mask tokens -> pixel prediction -> masked MSE loss.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mae_jax.config import ModelConfig, ViTConfig
from mae_jax.losses import masked_mse, normalize_patches
from mae_jax.masking import random_masking
from mae_jax.models import Decoder, Encoder
from mae_jax.patches import patchify

Params = dict[str, Any]


class MAEOutput(NamedTuple):
  loss: jax.Array  # [] float32
  pred: jax.Array  # [B, N, p*p*C] (in normalised-patch space when norm_pix_loss)
  mask: jax.Array  # [B, N] 1 = removed
  ids_restore: jax.Array  # [B, N]
  latent: jax.Array  # [B, 1 + L, D] encoder output (L = N with encoder_mask_tokens)


def check_images(images: jax.Array, config: ModelConfig | ViTConfig) -> None:
  """Raises a ValueError naming the problem unless images are [B, H, W, C] as configured."""
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {tuple(images.shape)}")
  _, h, w, c = images.shape
  if c != config.channels:
    raise ValueError(f"images have {c} channel{'s' * (c != 1)}, the config expects "
                     f"{config.channels} channel{'s' * (config.channels != 1)} "
                     "(images must be NHWC)")
  if (h, w) != (config.image_size, config.image_size):
    raise ValueError(f"images are {h}x{w}, the config expects "
                     f"{config.image_size}x{config.image_size}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be float (normalised with the dataset mean/std), "
                     f"got {images.dtype}")


def forward(params: Params, images: jax.Array, rng: jax.Array | None, config: ModelConfig,
            noise: jax.Array | None = None) -> MAEOutput:
  """Un-jitted MAE forward pass and loss; `mae_apply` is its jitted form."""
  check_images(images, config)
  if "decoder" not in params:
    raise ValueError("these params hold no decoder (an encoder-only checkpoint?): "
                     "mae_apply needs encoder and decoder; use mae_jax.encode for features")
  check_params(params, param_shapes(config), "mae_apply")
  if (noise is None) == (rng is None):
    raise ValueError("mae_apply: give exactly one of rng or noise, got "
                     + ("both" if noise is not None else "neither"))
  patches = patchify(images.astype(jnp.float32), config.patch_size)  # [B, N, P]
  b, n, _ = patches.shape
  masking = random_masking(patches, config.mask_ratio, noise=noise, rng=rng)
  if config.encoder_mask_tokens:
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    latent = Encoder(config.encoder, mask_tokens=True).apply(
        {"params": params["encoder"]}, patches, positions, masking.mask)
    pred = Decoder(config).apply({"params": params["decoder"]}, latent, None)
  else:
    latent = Encoder(config.encoder).apply({"params": params["encoder"]}, masking.kept,
                                           masking.ids_keep)
    pred = Decoder(config).apply({"params": params["decoder"]}, latent, masking.ids_restore)
  target = normalize_patches(patches) if config.norm_pix_loss else patches
  loss = masked_mse(pred, target, masking.mask)
  return MAEOutput(loss, pred, masking.mask, masking.ids_restore, latent)


@functools.partial(jax.jit, static_argnames=("config",))
def mae_apply(params: Params, images: jax.Array, rng: jax.Array | None = None, *,
              config: ModelConfig, noise: jax.Array | None = None) -> MAEOutput:
  """Jitted MAE forward pass: loss, prediction, mask, ids_restore, encoder output.

  images: [B, H, W, C] float, normalised with the dataset mean/std. Masking noise is drawn
  from `rng` unless `noise` ([B, N]) is given, in which case the kept patches are
  `argsort(noise)[:, :int(N * (1 - mask_ratio))]`, as in the reference.
  """
  return forward(params, images, rng, config, noise)


def _encode(encoder_params: Params, images: jax.Array, config: ModelConfig | ViTConfig,
            final_norm: bool = True) -> jax.Array:
  """Un-jitted encoder on all patches, no masking: [B, H, W, C] -> [B, 1 + N, D]."""
  check_images(images, config)
  if "encoder" in encoder_params and "patch_embed" not in encoder_params:
    raise ValueError("encode takes the encoder's params: pass params['encoder'], not the "
                     "whole {'encoder', 'decoder'} tree")
  mask_tokens = getattr(config, "encoder_mask_tokens", False)
  vit = config.encoder if isinstance(config, ModelConfig) else config
  check_params(encoder_params, encoder_param_shapes(vit, mask_tokens), "encode")
  patches = patchify(images.astype(jnp.float32), vit.patch_size)
  b, n, _ = patches.shape
  positions = jnp.broadcast_to(jnp.arange(n), (b, n))
  mask = jnp.zeros((b, n)) if mask_tokens else None
  return Encoder(vit, mask_tokens, final_norm).apply({"params": encoder_params}, patches,
                                                     positions, mask)


@functools.partial(jax.jit, static_argnames=("config",))
def encode(encoder_params: Params, images: jax.Array, *,
           config: ModelConfig | ViTConfig) -> jax.Array:
  """Encoder on all patches, no masking (for evaluation): [B, H, W, C] -> [B, 1 + N, D].

  `config` is an MAE config or just its encoder's (`ViTConfig`).
  """
  return _encode(encoder_params, images, config)


POOLS = ("cls", "avg")


def features(encoder_params: Params, images: jax.Array, config: ModelConfig | ViTConfig,
             pool: str = "cls") -> jax.Array:
  """Frozen-encoder features [B, D] as the reference's linear probe takes them.

  'cls': the cls token after the encoder's final norm. 'avg' (the reference's
  `global_pool`): the mean of the patch tokens before the final norm, then a LayerNorm
  without learned scale or offset (the probe's `fc_norm` is frozen at its initial values).
  """
  if pool == "cls":
    return _encode(encoder_params, images, config)[:, 0]
  if pool == "avg":
    pooled = _encode(encoder_params, images, config, final_norm=False)[:, 1:].mean(axis=1)
    mean = pooled.mean(-1, keepdims=True)
    var = pooled.var(-1, keepdims=True)
    return (pooled - mean) * jax.lax.rsqrt(var + config.layer_norm_eps)
  raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


@functools.partial(jax.jit, static_argnames=("config",))
def _init(rng: jax.Array, config: ModelConfig) -> Params:
  enc_rng, dec_rng = jax.random.split(rng)
  n, visible = config.num_patches, config.num_visible
  if config.encoder_mask_tokens:
    visible = n
  patches = jnp.zeros((1, visible, config.patch_dim))
  positions = jnp.arange(visible)[None]
  mask = jnp.zeros((1, n)) if config.encoder_mask_tokens else None
  encoder = Encoder(config.encoder, config.encoder_mask_tokens).init(
      enc_rng, patches, positions, mask)["params"]
  latent = jnp.zeros((1, 1 + visible, config.width))
  ids_restore = None if config.encoder_mask_tokens else jnp.arange(n)[None]
  decoder = Decoder(config).init(dec_rng, latent, ids_restore)["params"]
  return {"encoder": encoder, "decoder": decoder}


@functools.partial(jax.jit, static_argnames=("config",))
def init_encoder_params(config: ViTConfig, rng: jax.Array) -> Params:
  """A freshly initialised encoder alone (as in `init_params`), for classifiers."""
  patches = jnp.zeros((1, config.num_patches, config.patch_dim))
  positions = jnp.arange(config.num_patches)[None]
  return Encoder(config).init(rng, patches, positions)["params"]


@functools.lru_cache(maxsize=None)
def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{'encoder/blocks_0/attn/qkv/kernel': shape, ...}: the params tree this config needs."""
  return _flat_shapes(jax.eval_shape(init_params, config, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def encoder_param_shapes(config: ViTConfig, mask_tokens: bool = False
                         ) -> dict[str, tuple[int, ...]]:
  """The encoder's params tree (as `param_shapes`), for a ViT config alone."""
  n = config.num_patches
  encoder = Encoder(config, mask_tokens)
  shapes = jax.eval_shape(
      lambda rng: encoder.init(rng, jnp.zeros((1, n, config.patch_dim)), jnp.arange(n)[None],
                               jnp.zeros((1, n)) if mask_tokens else None)["params"],
      jax.random.key(0))
  return _flat_shapes(shapes)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


def check_params(params: Params, expected: dict[str, tuple[int, ...]], caller: str) -> None:
  """Raises a ValueError naming what differs between `params` and the config's tree
  (missing, unexpected or differently shaped entries), instead of a Flax scope error."""
  got = _flat_shapes(params)
  if got == expected:
    return
  problems = []
  shaped = sorted(k for k in expected.keys() & got.keys() if got[k] != expected[k])
  if shaped:
    k = shaped[0]
    problems.append(f"{len(shaped)} with other shapes, e.g. {k} is {got[k]}, the config "
                    f"expects {expected[k]}")
  for kind, keys in (("missing", expected.keys() - got.keys()),
                     ("unexpected", got.keys() - expected.keys())):
    if keys:
      more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
      problems.append(f"{kind}: {', '.join(sorted(keys)[:3])}{more}")
  raise ValueError(f"{caller}: the params do not match the config ({'; '.join(problems)}). "
                   "Pass the config the params were made with (load_pretrained returns it)")


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
  """The parameter pytree {'encoder', 'decoder'} with the reference's initialisation.

  Xavier-uniform Linear weights (fused qkv as one matrix), zero biases, unit LayerNorms,
  cls and mask tokens normal(0.02). Shapes only: `jax.eval_shape(init_params, config, rng)`.
  """
  return _init(rng, config)
