"""The labelled offline demo: scikit-learn's handwritten digits (1797 real 8x8 scans, 10
classes, in its wheel; a fixed split of 1437 train / 360 test), a tiny ViT, CPU minutes.

  python -m mae_jax.main --config=configs/digits.py --workdir=/tmp/digits_mae
  python -m mae_jax.main --config=configs/digits.py:task=linear_probe \
      --config.init_from=/tmp/digits_mae --workdir=/tmp/digits_probe
  python -m mae_jax.main --config=configs/digits.py:task=knn \
      --config.init_from=/tmp/digits_mae --workdir=/tmp/digits_knn
  python -m mae_jax.main --config=configs/digits.py:task=finetune \
      --config.init_from=/tmp/digits_mae --workdir=/tmp/digits_finetune
(`--config.init_from=random` for the random-weights baselines: for fine-tuning, the same
ViT trained from scratch with the same budget.)
"""
import ml_collections

from configs import base, finetune, knn, linear_probe

# The encoder every digits task shares: 16x16 views (the 8x8 scans upsampled), 4x4 patches.
ENCODER = dict(image_size=16, patch_size=4, channels=3, width=64, depth=4, num_heads=4,
               mlp_ratio=4.0, layer_norm_eps=1e-6, dtype="float32")
STEPS = {"pretrain": 1500, "linear_probe": 1000, "finetune": 1000}  # knn trains nothing
MEAN = (0.305,) * 3  # the digits' own pixel statistics (grayscale in three channels)
STD = (0.376,) * 3


def _digits_input(config: ml_collections.ConfigDict) -> None:
  config.input.update(dataset="digits", split="train", eval_split="test", mean=MEAN, std=STD,
                      crop_scale=(0.5, 1.0), hflip=False, worker_count=0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = base.parse_arg(arg, task="pretrain", steps=-1)
  steps = args.steps if args.steps > 0 else STEPS.get(args.task, 1)
  if args.task == "pretrain":
    config = base.get_config().unlock()
    config.model.update(**ENCODER, decoder_width=64, decoder_depth=2, decoder_num_heads=4,
                        norm_pix_loss=False)
    config.base_lr = 1.5e-3
    config.evals.reconstruction.update(every_steps=500, num_images=8)
    config.evals.knn = dict(type="knn", every_steps=500, k=20, temperature=0.07, pool="cls",
                            batch_size=256)
  elif args.task in ("linear_probe", "knn"):
    config = (linear_probe if args.task == "linear_probe" else knn).get_config().unlock()
    config.model.update(**ENCODER)
    config.num_classes = 10
    if args.task == "linear_probe":
      config.evals.classification.update(every_steps=0, batch_size=256)
      # LARS scales each step to lr x trust x |W| (trust 0.001, no weight decay, as the
      # reference): the head changes by up to ~lr/100 of its norm per step (momentum 0.9).
      # lr 5 (base 10 at batch 128): the loss falls smoothly, 2.06 (step 100) -> 0.63 (1000),
      # top-1 0.906. lr 200 reached top-1 0.897 while the head's norm grew to ~3e14 and the
      # loss to ~5e12: a classifier that is right but absurdly confident where it is wrong.
      config.base_lr = 10.0
    else:
      config.evals.knn.update(batch_size=256)
  elif args.task == "finetune":
    config = finetune.get_config().unlock()
    config.model.update(**ENCODER)
    config.num_classes = 10
    config.base_lr = 1e-3  # lr 5e-4 at batch 128; the recipe's decay 0.75, drop path 0.1
    config.layer_decay = 0.75
    config.evals.classification.update(every_steps=250, batch_size=256)
  else:
    raise ValueError(f"digits config: task must be pretrain, linear_probe, finetune or knn, "
                     f"got {args.task!r}")
  _digits_input(config)
  config.batch_size = 128
  config.total_steps = steps
  config.warmup_steps = steps // 20
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  return config.lock()
