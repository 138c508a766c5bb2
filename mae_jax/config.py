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
# Attention kernels: 'auto' is cuDNN's fused kernel on NVIDIA GPUs (Ampere on) in bfloat16
# and XLA's elsewhere (models.attention_implementation); 'cudnn' needs a GPU and bfloat16.
ATTENTIONS = ("auto", "xla", "cudnn")
# Fields that choose how the model computes, not what it is: a checkpoint's may differ from
# the config's (resuming, init_from), since the float32 weights are the same either way.
COMPUTE_FIELDS = ("dtype", "attention")


def _check_positive_ints(config, names) -> None:
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """A ViT encoder: patch embedding, fixed 2D sin-cos positions, pre-norm blocks, final norm.

  What every task shares (MAE's encoder, the linear probe's frozen backbone, a fine-tuned
  classifier); decoder and masking fields live in `ModelConfig` only.
  """

  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"  # activation dtype; parameters are always float32
  attention: str = "auto"  # which kernel computes attention (ATTENTIONS); same weights

  def __post_init__(self):
    _check_positive_ints(self, ("image_size", "patch_size", "channels", "width", "depth",
                                "num_heads"))
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by "
                       f"patch_size {self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.width % 4:  # 2D sin-cos embeddings split the width in four (sin/cos of rows/columns)
      raise ValueError(f"width {self.width} must be a multiple of 4 for 2D sin-cos embeddings")
    if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
      raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if self.attention == "cudnn" and self.dtype != "bfloat16":
      raise ValueError(f"attention 'cudnn' needs dtype 'bfloat16' (cuDNN's fused attention "
                       f"has no float32 kernel), got dtype {self.dtype!r}")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.channels

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(ViTConfig))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModelConfig(ViTConfig):
  """Architecture of an MAE: a ViT encoder (the ViTConfig fields it extends), the lightweight
  decoder, masking and loss options.

  Flat, as `model_config` takes it and as checkpoints store it; `.encoder` is its ViTConfig
  part alone, what a classifier on this encoder carries. Registered as a static pytree (no
  leaves), so it may be passed positionally through `jax.jit` or `jax.eval_shape` as well as
  as a static argument.
  """

  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  encoder_mask_tokens: bool = False  # the paper's ablation: encoder sees mask tokens too

  def __post_init__(self):
    super().__post_init__()
    _check_positive_ints(self, ("decoder_width", "decoder_depth", "decoder_num_heads"))
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
    if self.num_visible < 1:
      raise ValueError(f"mask_ratio {self.mask_ratio} keeps no patch out of {self.num_patches}")
    if self.decoder_width % self.decoder_num_heads:
      raise ValueError(f"decoder_width {self.decoder_width} is not divisible by "
                       f"decoder_num_heads {self.decoder_num_heads}")
    if self.decoder_width % 4:
      raise ValueError(f"decoder_width {self.decoder_width} must be a multiple of 4 for 2D "
                       "sin-cos embeddings")

  @property
  def encoder(self) -> ViTConfig:
    """The encoder's own config: what a classifier built on this MAE's encoder carries."""
    return ViTConfig(**{name: getattr(self, name) for name in ENCODER_FIELDS})

  @property
  def num_visible(self) -> int:
    """Patches kept per image: int(N * (1 - mask_ratio)), the reference's rule."""
    return int(self.num_patches * (1 - self.mask_ratio))

  @property
  def decoder_mlp_dim(self) -> int:
    return int(self.decoder_width * self.mlp_ratio)


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


def vit_config(variant: str = "B/16", **overrides: Any) -> ViTConfig:
  """The encoder config of a named variant with overrides (no decoder fields)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
  unknown = sorted(set(overrides) - set(ENCODER_FIELDS))
  if unknown:
    raise ValueError(f"unknown encoder config field(s) {unknown}; fields: "
                     f"{', '.join(ENCODER_FIELDS)}")
  return ViTConfig(**{**VARIANTS[variant], **overrides})


def config_from_dict(fields: dict[str, Any]) -> ModelConfig:
  """A ModelConfig from all of its fields (a run config, a checkpoint's JSON), checked."""
  unknown = sorted(set(fields) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown model config field(s) {unknown}; fields: {', '.join(FIELDS)}")
  return ModelConfig(**fields)
