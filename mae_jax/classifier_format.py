"""Reading fine-tuned ViT classifiers: the reference's `.pth` and Hugging Face directories.

Official fine-tuned checkpoints (`mae_finetuned_vit_{base,large,huge}.pth`, main_finetune.py)
hold the encoder with a learned `pos_embed`, `fc_norm` (global pool; no `norm`) and `head`.
A Hugging Face `ViTForImageClassification` directory holds `vit.*` (the cls token after
`vit.layernorm`) and `classifier`. Both are read through `convert`'s safe reader (no pickle
code runs) into the params of `classifier.Classifier`, every shape checked.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import convert, hf_format
from mae_jax.classifier import Params, interpolate_pos_embed

StateDict = dict[str, np.ndarray]


def _hf_classifier(path: str) -> tuple[str, dict[str, Any]]:
  """A ViTForImageClassification directory -> (weights file, checked config.json fields)."""
  with open(os.path.join(path, "config.json")) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}/config.json is not valid JSON ({e})") from None
  if not isinstance(hf, dict) or hf.get("model_type") != "vit":
    return "", {}
  for key, want in (("hidden_act", "gelu"), ("qkv_bias", True)):
    if hf.get(key, want) != want:
      raise ValueError(f"{path}/config.json: {key} is {hf[key]!r}, mae_jax's ViT needs {want!r}")
  names = [n for n in ("model.safetensors", "pytorch_model.bin")
           if os.path.isfile(os.path.join(path, n))]
  if not names:
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")
  return os.path.join(path, names[0]), hf


def read_state_dict(path: str) -> tuple[StateDict, dict[str, Any]]:
  """Reference-named state dict and, for a Hugging Face directory, its config.json fields."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  hf: dict[str, Any] = {}
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
      return {}, {}  # an Orbax workdir or checkpoint: not a fine-tuned file
    weights, hf = _hf_classifier(path)
    if not weights:
      return {}, {}  # a ViTMAE directory: a pretrained encoder
    path = weights
  sd, _ = convert._read_state_dict(path)  # pylint: disable=protected-access
  if hf_format.is_hf(sd):
    sd = hf_format.from_hf(sd)
    sd = {("head" + k[len("classifier"):] if k.startswith("classifier.") else k): v
          for k, v in sd.items()}
  return sd, hf


def load_classifier(path: str, abstract: Params, pool: str, num_classes: int
                    ) -> tuple[Params, dict[str, Any]] | None:
  """A fine-tuned classifier file -> (params shaped like `abstract`, the encoder fields a
  Hugging Face config.json states besides the shapes: layer_norm_eps, num_heads), or
  None when `path` holds no classifier head (a pretrained MAE, an mae_jax workdir).

  The position embeddings are resized to the model's grid (`interpolate_pos_embed`); every
  other shape must equal the model's, or a ValueError names the parameter. The file's pooling
  (fc_norm: 'avg'; norm: 'cls') must be `pool`, its class count `num_classes`.
  """
  sd, hf = read_state_dict(path)
  if "head.weight" not in sd:
    return None
  if sd["head.weight"].shape[0] != num_classes:
    raise ValueError(f"init_from {path} classifies {sd['head.weight'].shape[0]} classes, "
                     f"config.num_classes is {num_classes}")
  try:
    return _to_params(sd, hf, path, abstract, pool)
  except KeyError as e:
    raise ValueError(f"{path}: a classifier checkpoint without {e}") from None


def _to_params(sd: StateDict, hf: dict[str, Any], path: str, abstract: Params, pool: str
               ) -> tuple[Params, dict[str, Any]]:
  file_pool = "avg" if "fc_norm.weight" in sd else "cls"
  if file_pool != pool:
    raise ValueError(f"{path} is a classifier with pool {file_pool!r}, config.pool is {pool!r}")
  depth = len([k for k in sd if k.startswith("blocks.") and k.endswith(".norm1.weight")])
  conv = sd["patch_embed.proj.weight"]  # [D, C, p, p] -> [p, p, C, D] -> [p*p*C, D]
  enc = abstract["encoder"]
  if conv.shape[0] != enc["cls_token"].shape[-1]:
    raise ValueError(f"{path} holds another classifier than the config: width "
                     f"{conv.shape[0]}, config.model.width {enc['cls_token'].shape[-1]}")
  grid = int(round((enc["pos_embed"].shape[1] - 1) ** 0.5))
  encoder = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                      "bias": sd["patch_embed.proj.bias"]},
      "cls_token": sd["cls_token"],
      "pos_embed": interpolate_pos_embed(sd["pos_embed"], grid),
      **{f"blocks_{i}": convert._block(sd, f"blocks.{i}")  # pylint: disable=protected-access
         for i in range(depth)}}
  params = {"encoder": encoder, "head": convert._dense(sd, "head")}  # pylint: disable=protected-access
  if pool == "avg":
    params["fc_norm"] = convert._norm(sd, "fc_norm")  # pylint: disable=protected-access
  else:
    encoder["norm"] = convert._norm(sd, "norm")  # pylint: disable=protected-access
  want = {jax.tree_util.keystr(p): x.shape for p, x in
          jax.tree_util.tree_leaves_with_path(abstract)}
  got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  diff = {k: (got.get(k), want.get(k)) for k in sorted(set(want) | set(got))
          if got.get(k) != want.get(k)}
  if diff:
    raise ValueError(f"{path} holds another classifier than the config; (file, config) shapes: "
                     f"{dict(list(diff.items())[:6])}")
  found = {}
  if hf:  # what a .pth cannot say
    found.update(layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                 num_heads=hf.get("num_attention_heads", 12))
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), found
