"""Linear probing with the reference recipe (main_linprobe.py, the paper's A.2):

  python -m mae_jax.main --config=configs/linear_probe.py:variant=B/16 \
      --config.init_from=PRETRAINED --workdir=DIR

The encoder (from `init_from`: an mae_jax workdir or params checkpoint, an official .pth,
a Hugging Face directory; 'random' for the random-weights baseline) is frozen; a
BatchNorm (no affine) + linear head on its cls token is trained with LARS (momentum 0.9,
trust 0.001, no weight decay), lr = 0.1 x batch / 256, batch 16384, 10 warmup epochs then
cosine, 90 epochs (50 for L and H), RandomResizedCrop(224, 0.08-1) + flip. Top-1 / top-5
on the validation split go to the metrics and WORKDIR/results.json.
"""
import ml_collections

from configs import base
from mae_jax.config import vit_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = base.parse_arg(arg, variant="B/16", epochs=-1.0)
  epochs = args.epochs if args.epochs > 0 else (90 if args.variant in ("B/16",) else 50)
  config = base.run_config("linear_probe", epochs=epochs, warmup_epochs=10, batch_size=16384,
                           base_lr=0.1)
  config.model = ml_collections.ConfigDict(vit_config(args.variant, dtype="bfloat16").to_dict())
  config.num_classes = 1000
  config.pool = "cls"  # or 'avg': the reference's global_pool
  config.input.crop_scale = (0.08, 1.0)
  # LARS, as the reference.
  config.weight_decay = 0.0
  config.momentum = 0.9
  config.trust_coefficient = 0.001
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.evals.classification = dict(type="classification", every_steps=5 * 78,  # ~5 epochs
                                     batch_size=1024)
  return config.lock()
