"""One table between our parameters and the reference's and the hub's names, both directions.

Each row names one module three ways: its path in our params, its name in the reference's state
dict (facebookresearch/mae's models_mae.py and models_vit.py; timm's VisionTransformer uses the
same), and its name in the Hugging Face hub's checkpoints (`facebook/vit-mae-base`, and
ViTForImageClassification). Its kind says how the arrays map. Reading applies a row one way,
writing the other, so a renamed parameter is one edit here.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

from mae_jax.posemb import sincos_2d

StateDict = dict[str, np.ndarray]
Params = dict[str, Any]

# Kinds: how our arrays become the reference's tensors.
DENSE = "dense"  # {'kernel' [in, out], 'bias'} <-> .weight [out, in], .bias
NORM = "norm"  # {'scale', 'bias'} <-> .weight, .bias
PATCH = "patch"  # {'kernel' [p*p*C, D], 'bias'} <-> the conv's .weight [D, C, p, p], .bias
TENSOR = "tensor"  # an array, as it is
SINCOS = "sincos"  # MAE's fixed 2D sin-cos table: in the state dict, not in our params


class Row(NamedTuple):
  ours: str  # path in our params, '/'-separated
  reference: str  # module (or tensor) name in the reference's state dict
  hub: str  # name in the hub's checkpoints; '{}' in a block's attention: query, key, value
  kind: str


# Inside a transformer block: ours under blocks_{i}, the reference's under blocks.{i}, the
# hub's under encoder.layer.{i} (the MAE decoder: decoder_blocks / decoder.decoder_layers).
BLOCK = (Row("norm1", "norm1", "layernorm_before", NORM),
         Row("attn/qkv", "attn.qkv", "attention.attention.{}", DENSE),  # fused in ours
         Row("attn/proj", "attn.proj", "attention.output.dense", DENSE),
         Row("norm2", "norm2", "layernorm_after", NORM),
         Row("mlp/fc1", "mlp.fc1", "intermediate.dense", DENSE),
         Row("mlp/fc2", "mlp.fc2", "output.dense", DENSE))
QKV = ("query", "key", "value")  # the hub's order of the fused qkv's thirds
ENCODER_LAYERS = ("encoder/blocks_{}", "blocks.{}", "vit.encoder.layer.{}")
DECODER_LAYERS = ("decoder/decoder_blocks_{}", "decoder_blocks.{}", "decoder.decoder_layers.{}")
# Encoder rows outside the blocks. The hub's `vit.` prefix is dropped in a ViTMAEModel.
PATCH_EMBED = Row("encoder/patch_embed", "patch_embed.proj",
                  "vit.embeddings.patch_embeddings.projection", PATCH)
CLS_TOKEN = Row("encoder/cls_token", "cls_token", "vit.embeddings.cls_token", TENSOR)
POS_EMBED = Row("encoder/pos_embed", "pos_embed", "vit.embeddings.position_embeddings", TENSOR)
FINAL_NORM = Row("encoder/norm", "norm", "vit.layernorm", NORM)
DECODER = (Row("decoder/decoder_embed", "decoder_embed", "decoder.decoder_embed", DENSE),
           Row("decoder/mask_token", "mask_token", "decoder.mask_token", TENSOR),
           Row("decoder/decoder_pos_embed", "decoder_pos_embed", "decoder.decoder_pos_embed",
               SINCOS))
DECODER_END = (Row("decoder/decoder_norm", "decoder_norm", "decoder.decoder_norm", NORM),
               Row("decoder/decoder_pred", "decoder_pred", "decoder.decoder_pred", DENSE))
# A classifier's: global pooling's norm (no hub name: transformers' ViT has none) and the head.
FC_NORM = Row("fc_norm", "fc_norm", "", NORM)
HEAD = Row("head", "head", "classifier", DENSE)

# Other hub-side names of the same modules: transformers 5.x in-memory modules (`layers.N`,
# q_proj, ...) and the `decoder.decoder_encoder.layer.N` its save_pretrained writes.
HUB_LAYER_ALIASES = {"vit.layers": "vit.encoder.layer",
                     "decoder.decoder_encoder.layer": "decoder.decoder_layers"}
HUB_BLOCK_ALIASES = {"attention.q_proj": "attention.attention.query",
                     "attention.k_proj": "attention.attention.key",
                     "attention.v_proj": "attention.attention.value",
                     "attention.o_proj": "attention.output.dense",
                     "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def _blocks(layers: tuple[str, str, str], depth: int) -> list[Row]:
  ours, ref, hub = layers
  return [Row(f"{ours.format(i)}/{r.ours}", f"{ref.format(i)}.{r.reference}",
              f"{hub.format(i)}.{r.hub}", r.kind) for i in range(depth) for r in BLOCK]


def mae_rows(depth: int, decoder_depth: int = 0) -> list[Row]:
  """The rows of an MAE (models_mae.py); `decoder_depth` 0: its encoder alone."""
  rows = [PATCH_EMBED, CLS_TOKEN, POS_EMBED._replace(kind=SINCOS),
          *_blocks(ENCODER_LAYERS, depth), FINAL_NORM]
  if decoder_depth:
    rows += [*DECODER, *_blocks(DECODER_LAYERS, decoder_depth), *DECODER_END]
  return rows


def classifier_rows(depth: int, pool: str) -> list[Row]:
  """The rows of a fine-tuned classifier (models_vit.py): trained position embeddings, then
  `fc_norm` (pool 'avg', the reference's global pool) or the final `norm` ('cls'), and the head."""
  return [PATCH_EMBED, CLS_TOKEN, POS_EMBED, *_blocks(ENCODER_LAYERS, depth),
          FC_NORM if pool == "avg" else FINAL_NORM, HEAD]


def reference_keys(rows: list[Row]) -> list[str]:
  """The state-dict keys of `rows`, in order."""
  return [k for row in rows for k in (
      (row.reference,) if row.kind in (TENSOR, SINCOS)
      else (f"{row.reference}.weight", f"{row.reference}.bias"))]


def _get(params: Params, path: str) -> Any:
  for key in path.split("/"):
    params = params[key]
  return params


def _set(params: Params, path: str, value: Any) -> None:
  *parents, last = path.split("/")
  for key in parents:
    params = params.setdefault(key, {})
  params[last] = value


def sincos_table(row: Row, config: Any) -> np.ndarray:
  """The fixed [1, 1 + N, D] table of a SINCOS row for an MAE `config`."""
  width = config.decoder_width if row.ours.startswith("decoder/") else config.width
  return sincos_2d(width, config.grid_size, cls_token=True)[None]


def to_reference(params: Params, config: Any, rows: list[Row]) -> StateDict:
  """Our params -> the reference's state dict: float32, C-contiguous, writable numpy.

  `config` (ModelConfig or ViTConfig) gives the patch shape and the sin-cos tables.
  """
  sd = {}
  for row in rows:
    if row.kind == SINCOS:
      sd[row.reference] = sincos_table(row, config)
      continue
    x = _get(params, row.ours)
    name = row.reference
    if row.kind == TENSOR:
      sd[name] = x
    elif row.kind == NORM:
      sd.update({f"{name}.weight": x["scale"], f"{name}.bias": x["bias"]})
    elif row.kind == DENSE:
      sd.update({f"{name}.weight": np.asarray(x["kernel"]).T, f"{name}.bias": x["bias"]})
    else:  # PATCH: [p*p*C, D] -> [p, p, C, D] -> [D, C, p, p], the conv weight
      p, c = config.patch_size, config.channels
      kernel = np.asarray(x["kernel"])
      sd.update({f"{name}.weight": kernel.reshape(p, p, c, -1).transpose(3, 2, 0, 1),
                 f"{name}.bias": x["bias"]})
  return {k: np.array(v, np.float32, order="C") for k, v in sd.items()}  # own copies


def from_reference(sd: StateDict, rows: list[Row]) -> Params:
  """The reference's state dict -> our params (numpy, the file's dtype); SINCOS rows are left
  out (the caller checks them). A KeyError names a missing tensor."""
  params: Params = {}
  for row in rows:
    name = row.reference
    if row.kind == SINCOS:
      continue
    if row.kind == TENSOR:
      value = sd[name]
    elif row.kind == NORM:
      value = {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}
    elif row.kind == DENSE:
      value = {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}
    else:  # PATCH: [D, C, p, p] -> [p, p, C, D] -> [p*p*C, D]
      conv = sd[f"{name}.weight"]
      value = {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
               "bias": sd[f"{name}.bias"]}
    _set(params, row.ours, value)
  return params


# --- The hub's names ---------------------------------------------------------------------------

_SUFFIX = re.compile(r"(.+?)(\.weight|\.bias)?")
_OUTER = {r.reference: r.hub for r in (PATCH_EMBED, CLS_TOKEN, POS_EMBED, FINAL_NORM, *DECODER,
                                       *DECODER_END, HEAD)}
_OUTER_BACK = {hub: ref for ref, hub in _OUTER.items()}
_BLOCK = {r.reference: r.hub for r in BLOCK}
# A block's hub modules -> the reference's, the thirds of the fused qkv as attn.q, attn.k, attn.v.
_BLOCK_BACK = {r.hub: r.reference for r in BLOCK if "{}" not in r.hub}
_BLOCK_BACK.update({f"attention.attention.{third}": f"attn.{letter}"
                    for third, letter in zip(QKV, "qkv")})
_LAYERS = {layers[1].format(""): layers[2].format("") for layers in (ENCODER_LAYERS,
                                                                      DECODER_LAYERS)}
_LAYERS_BACK = {hub: ref for ref, hub in _LAYERS.items()}
_HUB_LAYER = re.compile(r"(vit\.encoder\.layer\.|decoder\.decoder_layers\.|vit\.layers\.|"
                        r"decoder\.decoder_encoder\.layer\.)(\d+)\.(.+)")


def is_hub(sd: StateDict) -> bool:
  """True for a state dict with the hub's names (ViTMAE, ViTMAEModel or ViT)."""
  return any(k.startswith(("vit.embeddings.", "embeddings.")) for k in sd)


def hub_name(key: str) -> str:
  """A reference key -> its hub key (a fused qkv's: with '{}' for query, key, value)."""
  module, suffix = _SUFFIX.fullmatch(key).groups()
  suffix = suffix or ""
  m = re.fullmatch(r"(blocks\.|decoder_blocks\.)(\d+)\.(.+)", module)
  if m:
    return f"{_LAYERS[m[1]]}{m[2]}.{_BLOCK[m[3]]}{suffix}"
  if not _OUTER.get(module):
    raise ValueError(f"{key} has no name in Hugging Face's models")
  return _OUTER[module] + suffix


def reference_name(key: str) -> str:
  """A hub key (or a transformers 5.x one, with or without `vit.`) -> the reference's key,
  with the thirds of qkv as `attn.q`, `attn.k`, `attn.v`; unknown keys unchanged."""
  given = key
  if key.startswith(("embeddings.", "encoder.", "layernorm.", "layers.")):
    key = "vit." + key  # a ViTMAEModel's
  module, suffix = _SUFFIX.fullmatch(key).groups()
  suffix = suffix or ""
  m = _HUB_LAYER.fullmatch(module)
  if m:
    layers = m[1][:-1]
    layers = HUB_LAYER_ALIASES.get(layers, layers) + "."
    part = _BLOCK_BACK.get(HUB_BLOCK_ALIASES.get(m[3], m[3]))
    return f"{_LAYERS_BACK[layers]}{m[2]}.{part}{suffix}" if part else given
  return _OUTER_BACK[module] + suffix if module in _OUTER_BACK else given


def from_hub(sd: StateDict) -> StateDict:
  """Hub keys -> the reference's, query/key/value fused into qkv ([3D, D], query first)."""
  out = {reference_name(k): v for k, v in sd.items()}
  for name in [k for k in out if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
    parts = [name.replace(".attn.q.", f".attn.{c}.") for c in "qkv"]
    if all(p in out for p in parts):
      out[name.replace(".attn.q.", ".attn.qkv.")] = np.concatenate([out.pop(p) for p in parts])
  return out


def to_hub(sd: StateDict, vit_prefix: bool = True) -> StateDict:
  """Reference keys -> hub keys, qkv split into query, key, value. `vit_prefix`: the encoder
  inside a ViTMAEForPreTraining or ViTForImageClassification (`vit.`); False: a ViTMAEModel."""
  out = {}
  for key, value in sd.items():
    name = hub_name(key)
    if not vit_prefix:
      name = name.removeprefix("vit.")
    if "{}" in name:
      out.update({name.format(third): part for third, part in zip(QKV, np.split(value, 3))})
    else:
      out[name] = value
  return out
