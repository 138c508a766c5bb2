"""The PyTorch MAE that benchmarks/gpu.sh times as the peer is the same model as mae_jax's:
our weights, exported in the official format, give our loss for the same images and noise."""
import os
import sys

import jax
import numpy as np
import torch

from mae_jax import init_params, mae_apply, model_config
from mae_jax.weights import Weights, write

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import torch_mae  # noqa: E402  (from benchmarks/)

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, decoder_width=16,
            decoder_depth=2, decoder_num_heads=2, dtype="float32")


def test_torch_peer_gives_mae_jax_loss_for_the_same_weights_and_noise(tmp_path):
  config = model_config("B/16", **TINY)
  params = init_params(config, jax.random.key(0))
  # Zero biases and unit norms would hide a swapped or missing one: perturb every weight.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  write.write(Weights("mae", params, config), "official", tmp_path / "mae.pth")
  state = torch.load(tmp_path / "mae.pth", weights_only=True)["model"]
  model = torch_mae.MAE(image_size=32, patch_size=8, width=32, depth=2, heads=2,
                        decoder_width=16, decoder_depth=2, decoder_heads=2)
  for name in ("pos_embed", "decoder_pos_embed"):  # its own sin-cos, before loading ours
    torch.testing.assert_close(getattr(model, name).data, state[name], rtol=0, atol=1e-6)
  model.load_state_dict(state, strict=True)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)  # [B, H, W, C]
  noise = rng.uniform(size=(3, 16)).astype(np.float32)  # [B, N]
  ours = float(mae_apply(params, images, config=config, noise=noise).loss)
  with torch.no_grad():
    theirs = float(model(torch.from_numpy(images).permute(0, 3, 1, 2),
                         torch.from_numpy(noise)))
  np.testing.assert_allclose(theirs, ours, rtol=1e-5)
