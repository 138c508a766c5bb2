"""Hugging Face ViTMAE format: key names and config.json, in both directions.

One table of names maps the reference's (facebookresearch/mae) state-dict keys to those of the
checkpoints on the hub (`facebook/vit-mae-base`): reading inverts it, writing applies it. The same
holds for config.json: one table of fields, every value checked for type and range on reading,
and written back from a ModelConfig.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from mae_jax.config import ModelConfig

StateDict = dict[str, np.ndarray]

# Reference module name -> hub module name (a block's modules, after `blocks.N.`).
_BLOCK = {"norm1": "layernorm_before", "attn.q": "attention.attention.query",
          "attn.k": "attention.attention.key", "attn.v": "attention.attention.value",
          "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
# Outside the blocks, encoder (under `vit.` in a ViTMAEForPreTraining) and decoder.
_ENCODER = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
            "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
_DECODER = {name: f"decoder.{name}" for name in ("mask_token", "decoder_pos_embed",
                                                 "decoder_embed", "decoder_norm", "decoder_pred")}
_LAYERS = {"blocks": "encoder.layer", "decoder_blocks": "decoder.decoder_layers"}

# Other names of the same modules: transformers 5.x in-memory modules (`layers.N`, q_proj, ...)
# and the `decoder.decoder_encoder.layer.N` that its save_pretrained writes.
_LAYER_ALIASES = {"layers": "encoder.layer", "decoder.decoder_encoder.layer":
                  "decoder.decoder_layers"}
_BLOCK_ALIASES = {"attention.q_proj": "attention.attention.query",
                  "attention.k_proj": "attention.attention.key",
                  "attention.v_proj": "attention.attention.value",
                  "attention.o_proj": "attention.output.dense",
                  "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}

_PARAM = re.compile(r"(.+?)(\.weight|\.bias)?")
_LAYER = re.compile(r"(encoder\.layer|decoder\.decoder_layers|layers|decoder\.decoder_encoder"
                    r"\.layer)\.(\d+)\.(.+)")


def is_hf(sd: StateDict) -> bool:
  return any(k.startswith(("vit.embeddings.", "embeddings.")) for k in sd)


def hub_name(key: str, pretraining: bool) -> str:
  """A reference key -> its hub key; `pretraining`: in a ViTMAEForPreTraining (`vit.` prefix)."""
  module, suffix = _PARAM.fullmatch(key).groups()
  suffix = suffix or ""
  prefix = "vit." if pretraining else ""
  m = re.fullmatch(r"(blocks|decoder_blocks)\.(\d+)\.(.+)", module)
  if m:
    layer = f"{_LAYERS[m[1]]}.{m[2]}.{_BLOCK[m[3]]}{suffix}"
    return layer if m[1] == "decoder_blocks" else prefix + layer
  if module in _ENCODER:
    return prefix + _ENCODER[module] + suffix
  return _DECODER[module] + suffix


_FROM_BLOCK = {hub: ref for ref, hub in _BLOCK.items()}
_FROM_OTHER = {hub: ref for ref, hub in {**_ENCODER, **_DECODER}.items()}
_FROM_LAYERS = {hub: ref for ref, hub in _LAYERS.items()}


def reference_name(key: str) -> str:
  """A hub key (or a transformers 5.x one) -> the reference's key; unknown keys unchanged."""
  module, suffix = _PARAM.fullmatch(key.removeprefix("vit.")).groups()
  suffix = suffix or ""
  m = _LAYER.fullmatch(module)
  if m:
    layers, part = _LAYER_ALIASES.get(m[1], m[1]), _BLOCK_ALIASES.get(m[3], m[3])
    if part in _FROM_BLOCK:
      return f"{_FROM_LAYERS[layers]}.{m[2]}.{_FROM_BLOCK[part]}{suffix}"
    return key
  return _FROM_OTHER[module] + suffix if module in _FROM_OTHER else key


def from_hf(sd: StateDict) -> StateDict:
  """Hub keys -> the reference's, query/key/value fused into qkv ([3D, D], q first)."""
  out = {reference_name(k): v for k, v in sd.items()}
  for name in [k for k in out if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
    parts = [name.replace(".attn.q.", f".attn.{c}.") for c in "qkv"]
    if all(p in out for p in parts):
      out[name.replace(".attn.q.", ".attn.qkv.")] = np.concatenate([out.pop(p) for p in parts])
  return out


def to_hf(sd: StateDict, pretraining: bool) -> StateDict:
  """Reference keys -> hub keys, qkv split into query, key, value."""
  out = {}
  for key, value in sd.items():
    if ".attn.qkv." in key:
      for c, part in zip("qkv", np.split(value, 3)):
        out[hub_name(key.replace(".attn.qkv.", f".attn.{c}."), pretraining)] = part
    else:
      out[hub_name(key, pretraining)] = value
  return out


# --- config.json -------------------------------------------------------------------------------

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


def read_config(path: str) -> dict[str, Any]:
  """A ViTMAE config.json -> its fields (defaults filled in), each checked for type and range.

  Raises a ValueError naming the file and the field. Sizes are checked against the weights
  later, by `model_config`.
  """
  def fail(why: str):
    raise ValueError(f"{path}: {why}; mae_jax cannot represent this model")

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
