"""End-to-end fine-tuning with the reference recipe (main_finetune.py, FINETUNE.md):

  python -m mae_jax.main --config=configs/finetune.py:variant=B/16 \
      --config.init_from=PRETRAINED --workdir=DIR

`init_from`: the pretrained encoder (an mae_jax workdir or params checkpoint, an official
.pth, a Hugging Face directory) or 'random' (the same ViT from scratch). To evaluate a
released fine-tuned checkpoint (`mae_finetuned_vit_base.pth`, a Hugging Face
ViTForImageClassification directory) on the validation split:

  python -m mae_jax.main --config=configs/finetune.py:variant=B/16 \
      --config.init_from=mae_finetuned_vit_base.pth --config.eval_only=True --workdir=DIR

Per variant (FINETUNE.md): B/16 blr 5e-4, layer decay 0.65, drop path 0.1, 100 epochs;
L/16 blr 1e-3, 0.75, 0.2, 50 epochs; H/14 blr 1e-3, 0.75, 0.3, 50 epochs; batch 1024,
AdamW (0.9, 0.999) wd 0.05, 5 warmup epochs then cosine to 1e-6.
"""
import ml_collections

from configs import base
from mae_jax.config import vit_config

# variant -> (base lr, layer decay, drop path, epochs)
RECIPES = {"B/16": (5e-4, 0.65, 0.1, 100), "L/16": (1e-3, 0.75, 0.2, 50),
           "H/14": (1e-3, 0.75, 0.3, 50)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = base.parse_arg(arg, variant="B/16")
  if args.variant not in RECIPES:
    raise ValueError(f"configs/finetune.py: the reference's recipes are for {sorted(RECIPES)}, "
                     f"got {args.variant!r}")
  blr, layer_decay, drop_path, epochs = RECIPES[args.variant]
  config = base.run_config("finetune", epochs=epochs, warmup_epochs=5, batch_size=1024,
                           base_lr=blr)
  config.model = ml_collections.ConfigDict(vit_config(args.variant, dtype="bfloat16").to_dict())
  config.num_classes = 1000
  config.pool = "avg"  # global pool + fc_norm; 'cls': the cls token after the final norm
  config.drop_path = drop_path
  # AdamW with layer-wise lr decay.
  config.weight_decay = 0.05
  config.b1 = 0.9
  config.b2 = 0.999
  config.layer_decay = layer_decay
  config.min_lr = 1e-6
  # Loss and batch augmentation: Mixup 0.8 or CutMix 1.0 (switched with probability 0.5,
  # applied with probability 1), label smoothing 0.1.
  config.smoothing = 0.1
  config.mixup = 0.8
  config.cutmix = 1.0
  config.mixup_prob = 1.0
  config.mixup_switch_prob = 0.5
  # Per image (timm's create_transform as the reference calls it): RandomResizedCrop
  # (0.08-1, bicubic), flip, RandAugment, normalise, random erasing (per-pixel noise).
  config.input.crop_scale = (0.08, 1.0)
  config.input.randaugment = "rand-m9-mstd0.5-inc1"
  config.input.reprob = 0.25
  config.input.normalize_on_device = False  # random erasing fills normalised host pixels
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1250  # ~1 epoch at batch 1024
  config.evals.classification = dict(type="classification", every_steps=1250, batch_size=1024)
  config.best_metric = "classification/top1"  # WORKDIR/best/<step>: the best state so far
  return config.lock()
