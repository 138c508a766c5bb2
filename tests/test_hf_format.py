"""Hugging Face config.json: hostile edits of a valid hub directory are refused, each naming
the field and the file, before any weights are used."""
import json
import math
import os

import pytest

import convert_fixtures as fx
from mae_jax import load_pretrained


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
  return fx.write_hub_dir(str(tmp_path_factory.mktemp("hub") / "vit-mae"),
                          fx.random_model(fx.hf_config(), seed=0))


def edited_dir(hub_dir, path, text):
  os.makedirs(path)
  with open(path / "config.json", "w") as f:
    f.write(text)
  os.symlink(os.path.join(hub_dir, "model.safetensors"), path / "model.safetensors")
  return path


# The tiny hub model: hidden 64 x 2 layers x 4 heads, MLP 256; decoder 32 x 2 x 4, MLP 128;
# 32x32 images, 8x8 patches.
@pytest.mark.parametrize("key,value,error", [
    ("hidden_size", "abc", "hidden_size is 'abc', not a positive int"),
    ("hidden_size", 128, "hidden_size is 128 but the weights have 64"),
    ("hidden_size", 64.0, "hidden_size is 64.0, not a positive int"),
    ("layer_norm_eps", "x", "layer_norm_eps is 'x', not a positive number"),
    ("layer_norm_eps", -1e-6, "layer_norm_eps is -1e-06, not a positive number"),
    ("layer_norm_eps", math.nan, "layer_norm_eps is nan, not a positive number"),
    ("layer_norm_eps", math.inf, "layer_norm_eps is inf, not a positive number"),
    ("layer_norm_eps", None, "layer_norm_eps is None, not a positive number"),
    ("num_hidden_layers", 3, "num_hidden_layers is 3 but the weights have 2"),
    ("num_hidden_layers", -2, "num_hidden_layers is -2, not a positive int"),
    ("num_attention_heads", 0, "num_attention_heads is 0, not a positive int"),
    ("num_attention_heads", 5, "hidden_size 64 is not divisible by num_attention_heads 5"),
    ("num_attention_heads", True, "num_attention_heads is True, not a positive int"),
    ("intermediate_size", 255, "intermediate_size is 255 but the weights have 256"),
    ("intermediate_size", [256], r"intermediate_size is \[256\], not a positive int"),
    ("num_channels", 1, "num_channels is 1 but the weights have 3"),
    ("image_size", "32", "image_size is '32', not a positive int"),
    ("image_size", [32, 48], r"image_size is \[32, 48\], not a positive int \(or a square"),
    ("image_size", 64, "image_size is 64 but the weights have 32"),
    ("patch_size", None, "patch_size is None, not a positive int"),
    ("decoder_hidden_size", 48, "decoder_hidden_size is 48 but the weights have 32"),
    ("decoder_num_hidden_layers", "2", "decoder_num_hidden_layers is '2', not a positive int"),
    ("decoder_num_attention_heads", 3, "decoder_hidden_size 32 is not divisible by "
                                       "decoder_num_attention_heads 3"),
    ("decoder_intermediate_size", 64, "decoder_intermediate_size is 64 but the weights have "
                                      "128"),
    ("mask_ratio", 1.0, r"mask_ratio is 1.0, not a number in \[0, 1\)"),
    ("mask_ratio", "0.75", r"mask_ratio is '0.75', not a number in \[0, 1\)"),
    ("mask_ratio", 0.99, "mask_ratio 0.99 keeps no patch out of 16"),
    ("norm_pix_loss", "false", "norm_pix_loss is 'false', not true or false"),
    ("qkv_bias", "yes", "qkv_bias is 'yes'; mae_jax's attention has a qkv bias"),
    ("hidden_act", "relu", "hidden_act is 'relu'; mae_jax uses exact GELU"),
    ("model_type", "vit", "model_type is 'vit', not 'vit_mae'"),
])
def test_hostile_config_fields_are_named(hub_dir, tmp_path, key, value, error):
  with open(os.path.join(hub_dir, "config.json")) as f:
    config = {**json.load(f), key: value}
  path = edited_dir(hub_dir, tmp_path / "hf", json.dumps(config))
  with pytest.raises(ValueError, match=error) as e:
    load_pretrained(path)
  assert str(path / "config.json") in str(e.value)


@pytest.mark.parametrize("text,error", [
    ("{\"hidden_size\": 64,", "is not valid JSON"),
    ("[64, 2]", "holds a JSON list, not an object of config fields"),
    (json.dumps({"architecture": "vit_base_patch16_224", "pretrained_cfg": {}}),
     "is timm's config.json, not a Hugging Face ViTMAE's"),
])
def test_config_files_that_are_no_vit_mae_config(hub_dir, tmp_path, text, error):
  with pytest.raises(ValueError, match=error):
    load_pretrained(edited_dir(hub_dir, tmp_path / "hf", text))


def test_the_unedited_directory_loads(hub_dir):
  _, config = load_pretrained(hub_dir)
  assert (config.width, config.depth, config.decoder_width) == (64, 2, 32)
