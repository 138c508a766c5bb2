"""How far the demo run gets beyond predicting each hidden patch's mean.

  python benchmarks/demo_loss.py --workdir=/tmp/mae_demo

Evaluates the masked-patch loss of the run's untrained model (step 0) and of its newest
checkpoint on the held-out demo images (several mask draws) and on training batches (the
run's augmentation), next to the loss of predicting each hidden patch's mean: the mean is
what the reconstruction display gets for free. In norm_pix space that prediction is 0 for
every normalised pixel, so its loss is the mean square of the normalised targets, just
below 1; on raw pixels it is the mean within-patch variance.
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import mae_apply
from mae_jax.checkpointing import load_params
from mae_jax.config import ModelConfig
from mae_jax.data import pipeline
from mae_jax.losses import masked_mse, normalize_patches
from mae_jax.masking import random_masking
from mae_jax.patches import patchify
from mae_jax.tasks.pretrain import PretrainTask


def patch_mean_loss(images: jax.Array, noise: jax.Array, model: ModelConfig) -> float:
  """The masked loss of predicting each hidden patch's mean (in the loss's own space)."""
  patches = patchify(images, model.patch_size)  # [B, N, P]
  mask = random_masking(patches, model.mask_ratio, noise=noise).mask
  if model.norm_pix_loss:
    target = normalize_patches(patches)
    return float(masked_mse(jnp.zeros_like(target), target, mask))
  return float(masked_mse(jnp.broadcast_to(patches.mean(-1, keepdims=True), patches.shape),
                          patches, mask))


def losses(params_by_name: dict, batches: list[jax.Array], model: ModelConfig,
           seed: int) -> dict[str, float]:
  rng = jax.random.key(seed)
  out = {name: [] for name in [*params_by_name, "patch mean"]}
  for i, images in enumerate(batches):
    noise = jax.random.uniform(jax.random.fold_in(rng, i), (images.shape[0], model.num_patches))
    for name, params in params_by_name.items():
      out[name].append(float(mae_apply(params, images, config=model, noise=noise).loss))
    out["patch mean"].append(patch_mean_loss(images, noise, model))
  return {name: float(np.mean(v)) for name, v in out.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished demo run")
  parser.add_argument("--draws", type=int, default=16, help="mask draws per image set")
  args = parser.parse_args()
  with open(os.path.join(args.workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = PretrainTask(config)
  model = task.model
  trained, _ = load_params(args.workdir)
  params = {"step 0": task.init(jax.random.key(config.seed))[0], "trained": trained}

  held_out = jnp.asarray(pipeline.make_eval_batch(config.input, image_size=model.image_size,
                                                  num_images=32))
  loader = iter(task.train_loader(task.train_source()))
  train = [jnp.asarray(next(loader)["image"]) for _ in range(args.draws // 4)]
  print(f"masked-patch loss ({'norm_pix' if model.norm_pix_loss else 'pixels'}, mask ratio "
        f"{model.mask_ratio}) of {args.workdir}")
  for name, batches in (("held-out images", [held_out] * args.draws),
                        ("training batches", train)):
    row = losses(params, batches, model, seed=1)
    print(f"  {name:17s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items())
          + f"  (trained / patch mean = {row['trained'] / row['patch mean']:.2f})")


if __name__ == "__main__":
  main()
