"""Small PyTorch MAE checkpoints for the conversion tests, built with transformers' ViTMAE.

The names written here are written independently of mae_jax.convert: the hub's (as in
facebook/vit-mae-base), and the reference's (facebookresearch/mae `.pth`, fused qkv).
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers.models.vit_mae import modeling_vit_mae

TINY = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=256, decoder_hidden_size=32,
            decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
            decoder_intermediate_size=128, hidden_act="gelu", layer_norm_eps=1e-12)

# transformers 5.x module names -> the names in the hub checkpoints.
_HUB_LAYER_NAMES = {"attention.q_proj": "attention.attention.query",
                    "attention.k_proj": "attention.attention.key",
                    "attention.v_proj": "attention.attention.value",
                    "attention.o_proj": "attention.output.dense",
                    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def hf_config(**overrides) -> ViTMAEConfig:
  return ViTMAEConfig(**{**TINY, **overrides})


def hf_sincos(dim: int, grid: int) -> torch.Tensor:
  """transformers' own fixed embedding [1, 1 + N, dim], built as its initialize_weights does.

  transformers 5.24 skips that initialisation on freshly built models (both embeddings stay 0),
  so the tests set them, as the hub checkpoints have them.
  """
  emb = modeling_vit_mae.build_2d_sinusoidal_position_embedding(grid, grid, embed_dim=dim,
                                                                cls_token=True)
  half = dim // 2
  return torch.cat([emb[:, half:], emb[:, :half]], dim=1)[None]  # the reference's (w, h) order


def random_model(config: ViTMAEConfig, seed: int) -> ViTMAEForPreTraining:
  """A ViTMAEForPreTraining with every weight random (norms and biases too), fixed posembs."""
  torch.manual_seed(seed)
  model = ViTMAEForPreTraining(config).eval()
  grid = config.image_size // config.patch_size
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    model.vit.embeddings.position_embeddings.copy_(hf_sincos(config.hidden_size, grid))
    model.decoder.decoder_pos_embed.copy_(hf_sincos(config.decoder_hidden_size, grid))
  return model


def encoder_model(model: ViTMAEForPreTraining) -> ViTMAEModel:
  """The encoder of `model` as a ViTMAEModel that keeps every patch (mask_ratio 0)."""
  encoder = ViTMAEModel(ViTMAEConfig(**{**model.config.to_dict(), "mask_ratio": 0.0})).eval()
  encoder.load_state_dict(model.vit.state_dict())
  return encoder


def hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
  """The weights under the names of the hub checkpoints (vit.encoder.layer.N..., decoder...)."""
  out = {}
  for key, value in model.state_dict().items():
    key = re.sub(r"^(vit\.)?layers\.", r"\1encoder.layer.", key)
    for new, hub in _HUB_LAYER_NAMES.items():
      key = key.replace(f".{new}.", f".{hub}.")
    out[key] = value.detach().clone().contiguous()
  return out


def reference_state_dict(model: ViTMAEForPreTraining) -> dict[str, torch.Tensor]:
  """The weights under facebookresearch/mae's names, query/key/value fused into qkv."""
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  out = {"cls_token": sd["vit.embeddings.cls_token"],
         "pos_embed": sd["vit.embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["vit.layernorm.weight"], "norm.bias": sd["vit.layernorm.bias"],
         "mask_token": sd["decoder.mask_token"],
         "decoder_pos_embed": sd["decoder.decoder_pos_embed"]}
  for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
    for w in ("weight", "bias"):
      out[f"{name}.{w}"] = sd[f"decoder.{name}.{w}"]
  blocks = [(f"blocks.{i}", f"vit.layers.{i}") for i in range(model.config.num_hidden_layers)]
  blocks += [(f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}")
             for i in range(model.config.decoder_num_hidden_layers)]
  for ref, hf in blocks:
    for w in ("weight", "bias"):
      out[f"{ref}.norm1.{w}"] = sd[f"{hf}.layernorm_before.{w}"]
      out[f"{ref}.attn.qkv.{w}"] = torch.cat([sd[f"{hf}.attention.{c}_proj.{w}"]
                                              for c in "qkv"])
      out[f"{ref}.attn.proj.{w}"] = sd[f"{hf}.attention.o_proj.{w}"]
      out[f"{ref}.norm2.{w}"] = sd[f"{hf}.layernorm_after.{w}"]
      out[f"{ref}.mlp.fc1.{w}"] = sd[f"{hf}.mlp.fc1.{w}"]
      out[f"{ref}.mlp.fc2.{w}"] = sd[f"{hf}.mlp.fc2.{w}"]
  return out


def write_hub_dir(path: str, model: torch.nn.Module, weights: str = "model.safetensors") -> str:
  """A directory as on the hub: config.json and hub-named weights (safetensors or .bin)."""
  os.makedirs(path)
  model.config.to_json_file(os.path.join(path, "config.json"))
  sd = hub_state_dict(model)
  if weights == "model.safetensors":
    save_file(sd, os.path.join(path, weights), metadata={"format": "pt"})
  else:
    torch.save(sd, os.path.join(path, weights))
  return path


def nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def pretraining_outputs(model: ViTMAEForPreTraining, images: np.ndarray, noise: np.ndarray
                        ) -> tuple[float, np.ndarray, np.ndarray]:
  """(loss, logits, mask) of the torch model for NHWC images and the given masking noise."""
  with torch.no_grad():
    out = model(nchw(images), noise=torch.from_numpy(noise))
  return float(out.loss), out.logits.numpy(), out.mask.numpy()


def encoder_outputs(encoder: ViTMAEModel, images: np.ndarray) -> np.ndarray:
  """last_hidden_state over all patches in grid order (mask_ratio 0 and increasing noise)."""
  n = (encoder.config.image_size // encoder.config.patch_size) ** 2
  noise = torch.arange(n, dtype=torch.float32).expand(images.shape[0], n)
  with torch.no_grad():
    return encoder(nchw(images), noise=noise).last_hidden_state.numpy()
