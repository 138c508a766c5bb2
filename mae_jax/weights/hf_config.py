"""Hugging Face config.json, both directions: ViTMAE (pretraining) and ViT (classifiers).

One table of fields: every value read is checked for type and range, and a ModelConfig is
written back the same way.
"""
from __future__ import annotations

import json
import math
from typing import Any

from mae_jax.config import ModelConfig, ViTConfig

# ViTMAEConfig defaults, for fields a config.json leaves out.
DEFAULTS = dict(model_type="vit_mae", hidden_size=768, num_hidden_layers=12,
                num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                qkv_bias=True, decoder_num_attention_heads=16, decoder_hidden_size=512,
                decoder_num_hidden_layers=8, decoder_intermediate_size=2048, mask_ratio=0.75,
                norm_pix_loss=False)
# config.json field -> ModelConfig field or property, for the fields that are sizes.
SIZES = {"image_size": "image_size", "patch_size": "patch_size", "num_channels": "channels",
         "hidden_size": "width", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
         "intermediate_size": "mlp_dim", "decoder_hidden_size": "decoder_width",
         "decoder_num_hidden_layers": "decoder_depth",
         "decoder_num_attention_heads": "decoder_num_heads",
         "decoder_intermediate_size": "decoder_mlp_dim"}
_POSITIVE_INTS = tuple(k for k in SIZES if k not in ("image_size", "patch_size"))


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_json(path: str) -> dict[str, Any]:
  """A config.json's object; a ValueError for anything else, and for timm's config.json."""
  try:
    with open(path) as f:
      raw = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object of config fields")
  if "pretrained_cfg" in raw and "architecture" in raw:
    raise ValueError(f"{path} is timm's config.json, not a Hugging Face ViTMAE's; load the "
                     f"weights file itself: load_pretrained('DIR/model.safetensors', config)")
  return raw


def mae_fields(raw: dict[str, Any], path: str) -> dict[str, Any]:
  """A ViTMAE config.json's object -> its fields (defaults filled in), each checked for type
  and range. Raises a ValueError naming the file and the field. Sizes are checked against the
  weights later, by `model_config`.
  """
  def fail(why: str):
    raise ValueError(f"{path}: {why}; mae_jax cannot represent this model")

  hf = {**DEFAULTS, **raw}
  if hf["model_type"] != "vit_mae":
    fail(f"model_type is {hf['model_type']!r}, not 'vit_mae'")
  if hf["hidden_act"] != "gelu":
    fail(f"hidden_act is {hf['hidden_act']!r}; mae_jax uses exact GELU (Hugging Face 'gelu')")
  if hf["qkv_bias"] is not True:
    fail(f"qkv_bias is {hf['qkv_bias']!r}; mae_jax's attention has a qkv bias (true)")
  for key in ("image_size", "patch_size"):
    value = hf[key]
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
      value = value[0]
    if not (_is_int(value) and value > 0):
      fail(f"{key} is {value!r}, not a positive int (or a square [n, n])")
    hf[key] = value
  for key in _POSITIVE_INTS:
    if not (_is_int(hf[key]) and hf[key] > 0):
      fail(f"{key} is {hf[key]!r}, not a positive int")
  if not (_is_real(hf["layer_norm_eps"]) and hf["layer_norm_eps"] > 0):
    fail(f"layer_norm_eps is {hf['layer_norm_eps']!r}, not a positive number")
  if not (_is_real(hf["mask_ratio"]) and 0 <= hf["mask_ratio"] < 1):
    fail(f"mask_ratio is {hf['mask_ratio']!r}, not a number in [0, 1)")
  if not isinstance(hf["norm_pix_loss"], bool):
    fail(f"norm_pix_loss is {hf['norm_pix_loss']!r}, not true or false")
  return hf


def model_config(hf: dict[str, Any], found: dict[str, Any], source: str) -> ModelConfig:
  """Checked config.json fields + the sizes the weights show (`found`) -> ModelConfig.

  Each size is compared with the weights first, so an edited field is named as itself.
  """
  def fail(why: str):
    raise ValueError(f"{source}: {why}; mae_jax cannot represent this model")

  diffs = [f"{key} is {hf[key]} but the weights have {found[name]}"
           for key, name in SIZES.items() if name in found and hf[key] != found[name]]
  if diffs:
    fail("; ".join(diffs))
  for width, heads in (("hidden_size", "num_attention_heads"),
                       ("decoder_hidden_size", "decoder_num_attention_heads")):
    if hf[width] % hf[heads]:
      fail(f"{width} {hf[width]} is not divisible by {heads} {hf[heads]}")
  if hf["image_size"] % hf["patch_size"]:
    fail(f"image_size {hf['image_size']} is not divisible by patch_size {hf['patch_size']}")
  mlp_ratio = hf["intermediate_size"] / hf["hidden_size"]
  if int(hf["hidden_size"] * mlp_ratio) != hf["intermediate_size"]:
    fail(f"intermediate_size {hf['intermediate_size']} is no whole multiple of hidden_size "
         f"{hf['hidden_size']} mae_jax can represent")
  # One MLP ratio serves both; for an encoder alone the decoder's fields are unused.
  if ("decoder_width" in found
      and int(hf["decoder_hidden_size"] * mlp_ratio) != hf["decoder_intermediate_size"]):
    fail(f"the decoder's MLP ratio (decoder_intermediate_size {hf['decoder_intermediate_size']}"
         f" / decoder_hidden_size {hf['decoder_hidden_size']}) differs from the encoder's "
         f"(intermediate_size {hf['intermediate_size']} / hidden_size {hf['hidden_size']})")
  try:
    return ModelConfig(
        image_size=hf["image_size"], patch_size=hf["patch_size"], channels=hf["num_channels"],
        width=hf["hidden_size"], depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], mlp_ratio=mlp_ratio,
        decoder_width=hf["decoder_hidden_size"], decoder_depth=hf["decoder_num_hidden_layers"],
        decoder_num_heads=hf["decoder_num_attention_heads"], mask_ratio=hf["mask_ratio"],
        norm_pix_loss=hf["norm_pix_loss"], layer_norm_eps=hf["layer_norm_eps"])
  except ValueError as e:
    fail(str(e))


def config_json(config: ModelConfig, pretraining: bool) -> dict[str, Any]:
  """The config.json of `config` as ViTMAEForPreTraining (or ViTMAEModel) on the hub."""
  out = {"architectures": ["ViTMAEForPreTraining" if pretraining else "ViTMAEModel"],
         "model_type": "vit_mae", "hidden_act": "gelu", "qkv_bias": True,
         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
         "initializer_range": 0.02, "dtype": "float32"}
  out.update({key: getattr(config, name) for key, name in SIZES.items()})
  out.update(layer_norm_eps=config.layer_norm_eps, mask_ratio=config.mask_ratio,
             norm_pix_loss=config.norm_pix_loss)
  return out


# --- ViTForImageClassification -----------------------------------------------------------------

# transformers' ViTConfig defaults for the fields mae_jax reads from a classifier's config.json.
VIT_DEFAULT_HEADS, VIT_DEFAULT_EPS = 12, 1e-12


def vit_fields(raw: dict[str, Any], path: str) -> dict[str, Any]:
  """What a ViTForImageClassification config.json says besides the weights' shapes:
  num_heads, layer_norm_eps and, where it names every class, class_names."""
  for key, want in (("hidden_act", "gelu"), ("qkv_bias", True)):
    if raw.get(key, want) != want:
      raise ValueError(f"{path}: {key} is {raw[key]!r}, mae_jax's ViT needs {want!r}")
  return {"num_heads": raw.get("num_attention_heads", VIT_DEFAULT_HEADS),
          "layer_norm_eps": raw.get("layer_norm_eps", VIT_DEFAULT_EPS),
          "id2label": raw.get("id2label")}


def class_names(id2label: Any, num_classes: int) -> list[str] | None:
  """An id2label dict -> the names in class order, or None unless it names each class once."""
  if not isinstance(id2label, dict) or set(id2label) != {str(i) for i in range(num_classes)}:
    return None
  return [str(id2label[str(i)]) for i in range(num_classes)]


def classifier_json(encoder: ViTConfig, class_names: list[str]) -> dict[str, Any]:
  """config.json of a ViTForImageClassification, with the class names."""
  return {"architectures": ["ViTForImageClassification"], "model_type": "vit",
          "hidden_size": encoder.width, "num_hidden_layers": encoder.depth,
          "num_attention_heads": encoder.num_heads, "intermediate_size": encoder.mlp_dim,
          "hidden_act": "gelu", "layer_norm_eps": encoder.layer_norm_eps,
          "image_size": encoder.image_size, "patch_size": encoder.patch_size,
          "num_channels": encoder.channels, "qkv_bias": True, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "dtype": "float32",
          "id2label": {str(i): name for i, name in enumerate(class_names)},
          "label2id": {name: i for i, name in enumerate(class_names)}}
