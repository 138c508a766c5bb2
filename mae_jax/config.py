"""Frozen model configuration and the paper's named variants.

`ModelConfig` is a frozen, hashable dataclass so it can be a static argument of `jax.jit`.
Every value is checked when the config is built: a bad config fails here, before any compile.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

# Encoder sizes from the ViT paper, as used by MAE (Table 1 of MAE uses B/16, L/16, H/14).
VARIANTS: dict[str, dict[str, int]] = {
    "Ti/16": dict(width=192, depth=12, num_heads=3, patch_size=16),
    "S/16": dict(width=384, depth=12, num_heads=6, patch_size=16),
    "B/16": dict(width=768, depth=12, num_heads=12, patch_size=16),
    "L/16": dict(width=1024, depth=24, num_heads=16, patch_size=16),
    "H/14": dict(width=1280, depth=32, num_heads=16, patch_size=14),
}

DTYPES = ("float32", "bfloat16")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of an MAE: ViT encoder, lightweight decoder, masking and loss options.

  Registered as a static pytree (no leaves), so it may be passed positionally through
  `jax.jit` or `jax.eval_shape` as well as as a static argument.
  """

  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"  # activation dtype; parameters are always float32
  encoder_mask_tokens: bool = False  # the paper's ablation: encoder sees mask tokens too

  def __post_init__(self):
    for name in ("image_size", "patch_size", "channels", "width", "depth", "num_heads",
                 "decoder_width", "decoder_depth", "decoder_num_heads"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by "
                       f"patch_size {self.patch_size}")
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
    if self.num_visible < 1:
      raise ValueError(f"mask_ratio {self.mask_ratio} keeps no patch out of {self.num_patches}")
    for w, h, tag in ((self.width, self.num_heads, ""),
                      (self.decoder_width, self.decoder_num_heads, "decoder_")):
      if w % h:
        raise ValueError(f"{tag}width {w} is not divisible by {tag}num_heads {h}")
      if w % 4:  # 2D sin-cos embeddings split the width in four (sin/cos of rows/columns)
        raise ValueError(f"{tag}width {w} must be a multiple of 4 for 2D sin-cos embeddings")
    if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
      raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def num_visible(self) -> int:
    """Patches kept per image: int(N * (1 - mask_ratio)), the reference's rule."""
    return int(self.num_patches * (1 - self.mask_ratio))

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.channels

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def decoder_mlp_dim(self) -> int:
    return int(self.decoder_width * self.mlp_ratio)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def model_config(variant: str = "B/16", **overrides: Any) -> ModelConfig:
  """Returns the frozen config of a named variant ("Ti/16" ... "H/14") with overrides.

  The decoder defaults to the paper's 512 wide x 8 blocks x 16 heads for every variant.
  Unknown fields and impossible values raise ValueError.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
  unknown = sorted(set(overrides) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown model config field(s) {unknown}; fields: {', '.join(FIELDS)}")
  return ModelConfig(**{**VARIANTS[variant], **overrides})


def config_from_dict(fields: dict[str, Any]) -> ModelConfig:
  """A ModelConfig from all of its fields (a run config, a checkpoint's JSON), checked."""
  unknown = sorted(set(fields) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown model config field(s) {unknown}; fields: {', '.join(FIELDS)}")
  return ModelConfig(**fields)
