"""How far the demo run gets beyond predicting flat patches of the right colour.

  python benchmarks/demo_loss.py --workdir=/tmp/mae_demo

Evaluates the masked-patch loss of the run's untrained model (step 0) and of its newest
checkpoint on the held-out demo images (several mask draws) and on training batches (the
run's augmentation), next to the loss of predicting each hidden patch's mean: the mean is
what the reconstruction display gets for free. In norm_pix space that prediction is 0 for
every normalised pixel, so its loss is the mean square of the normalised targets, just
below 1; on raw pixels it is the mean within-patch variance.

Each loss is split exactly into a colour part (the error of each channel's mean over the
patch) and a structure part (the error in how pixels vary around those means). Any flat
prediction, whatever its colours, has the same structure part: the targets' own variation.
A model predicts shading or edges inside the patches only if its structure part is below
that; `structure explained` is the fraction of it the model accounts for.
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
from mae_jax.losses import normalize_patches
from mae_jax.masking import random_masking
from mae_jax.patches import patchify
from mae_jax.tasks.pretrain import PretrainTask


def loss_parts(pred: jax.Array, target: jax.Array, mask: jax.Array,
               channels: int) -> tuple[float, float]:
  """The masked MSE split into (colour, structure) parts that sum to it.

  pred, target: [B, N, p*p*C] with channels last in each patch (`patchify`'s order).
  """
  error = (pred - target).reshape(*target.shape[:2], -1, channels)  # [B, N, p*p, C]
  colour = error.mean(2, keepdims=True)  # [B, N, 1, C] each channel's mean error
  per_patch = ((colour ** 2).mean((2, 3)), ((error - colour) ** 2).mean((2, 3)))  # [B, N]
  return tuple(float((part * mask).sum() / mask.sum()) for part in per_patch)


def targets(images: jax.Array, noise: jax.Array, model: ModelConfig
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The loss's targets [B, N, P], the mask [B, N] and each patch's mean prediction."""
  patches = patchify(images, model.patch_size)  # [B, N, P]
  mask = random_masking(patches, model.mask_ratio, noise=noise).mask
  if model.norm_pix_loss:
    target = normalize_patches(patches)
    return target, mask, jnp.zeros_like(target)
  return patches, mask, jnp.broadcast_to(patches.mean(-1, keepdims=True), patches.shape)


def losses(params_by_name: dict, batches: list[jax.Array], model: ModelConfig,
           seed: int) -> dict[str, np.ndarray]:
  """{name: [loss, colour part, structure part]}, averaged over the batches."""
  rng = jax.random.key(seed)
  out = {name: [] for name in [*params_by_name, "patch mean"]}
  for i, images in enumerate(batches):
    noise = jax.random.uniform(jax.random.fold_in(rng, i), (images.shape[0], model.num_patches))
    target, mask, patch_mean = targets(images, noise, model)
    for name, params in params_by_name.items():
      output = mae_apply(params, images, config=model, noise=noise)
      colour, structure = loss_parts(output.pred, target, mask, model.channels)
      np.testing.assert_allclose(colour + structure, output.loss, rtol=1e-4)  # parts add up
      out[name].append((colour + structure, colour, structure))
    colour, structure = loss_parts(patch_mean, target, mask, model.channels)
    out["patch mean"].append((colour + structure, colour, structure))
  return {name: np.mean(v, axis=0) for name, v in out.items()}


def measure(workdir: str, draws: int = 16) -> dict[str, dict[str, np.ndarray]]:
  """{'held-out images' | 'training batches': {'step 0' | 'trained' | 'patch mean':
  [loss, colour part, structure part]}} of the demo run in `workdir` (newest checkpoint)."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = PretrainTask(config)
  model = task.model
  trained, _ = load_params(workdir)
  params = {"step 0": task.init(jax.random.key(config.seed))[0], "trained": trained}

  held_out = jnp.asarray(pipeline.make_eval_batch(config.input, image_size=model.image_size,
                                                  num_images=32))
  loader = iter(task.train_loader(task.train_source()))
  # uint8 batches (input.normalize_on_device) become the model's normalised input here.
  train = [pipeline.device_images(jnp.asarray(next(loader)["image"]), config.input)
           for _ in range(draws // 4)]
  return {name: losses(params, batches, model, seed=1)
          for name, batches in (("held-out images", [held_out] * draws),
                                ("training batches", train))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished demo run")
  parser.add_argument("--draws", type=int, default=16, help="mask draws per image set")
  args = parser.parse_args()
  with open(os.path.join(args.workdir, "config.json")) as f:
    model = PretrainTask(ml_collections.ConfigDict(json.load(f))).model
  print(f"masked-patch loss ({'norm_pix' if model.norm_pix_loss else 'pixels'}, mask ratio "
        f"{model.mask_ratio}) of {args.workdir} = colour part + structure part")
  for name, rows in measure(args.workdir, args.draws).items():
    flat = rows["patch mean"][2]  # the structure part of every flat prediction
    print(f"  {name}:")
    for k, (loss, colour, structure) in rows.items():
      print(f"    {k:10s} loss {loss:.4f} = {colour:.4f} + {structure:.4f}  "
            f"(structure explained {1 - structure / flat:6.1%})")
    print(f"    trained / patch mean = {rows['trained'][0] / rows['patch mean'][0]:.2f}")


if __name__ == "__main__":
  main()
