"""A small MAE that learns on one CPU in minutes, on the bundled demo photographs.

  python -m mae_jax.main --config=configs/demo.py --workdir=/tmp/mae_demo
"""
import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = base.parse_arg(arg, steps=600)
  config = base.get_config().unlock()
  # The decoder as wide as the encoder (the paper's is 512 wide for 768-value patches).
  config.model.update(image_size=64, patch_size=8, width=128, depth=4,
                      num_heads=4, decoder_width=128, decoder_depth=2, decoder_num_heads=4,
                      dtype="float32")
  config.input.dataset = "demo"
  config.input.eval_split = "val"
  config.input.worker_count = 0
  config.batch_size = 64
  config.total_steps = args.steps
  config.warmup_steps = min(30, args.steps // 10)
  config.base_lr = 6e-3  # peak lr 1.5e-3 at batch 64: small models and batches like a larger lr
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  config.evals.reconstruction.update(every_steps=200, num_images=6)
  return config.lock()
