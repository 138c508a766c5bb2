"""A small MAE that learns on one CPU in minutes, on the bundled demo photographs.

  python -m mae_jax.main --config=configs/demo.py --workdir=/tmp/mae_demo
"""
import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = base.parse_arg(arg, steps=3000)
  config = base.get_config().unlock()
  # Narrow and many steps: on 2 CPU cores a 64-wide MAE at batch 32 gets past flat patch
  # colours to shading inside the patches within the budget; 128 wide at batch 64 (600
  # steps in the same time) and a deeper decoder stayed at colours (BENCHMARKS.md, the demo).
  config.model.update(image_size=64, patch_size=8, width=64, depth=4,
                      num_heads=4, decoder_width=64, decoder_depth=2, decoder_num_heads=4,
                      dtype="float32")
  config.input.dataset = "demo"
  config.input.eval_split = "val"
  config.input.worker_count = 0
  config.batch_size = 32
  config.total_steps = args.steps
  config.warmup_steps = min(100, args.steps // 10)
  config.base_lr = 0.024  # peak lr 3e-3 at batch 32: small models and batches like a larger lr
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.evals.reconstruction.update(every_steps=1000, num_images=6)
  return config.lock()
