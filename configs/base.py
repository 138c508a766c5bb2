"""MAE pretraining with the paper's recipe: ViT-B/16 on ImageNet-1k (He et al. 2022, A.1).

Other encoders through the argument, e.g.
  python -m mae_jax.main --config=configs/base.py:variant=L/16,epochs=1600 --workdir=DIR
and any field with --config.<field>=<value>.
"""
import ml_collections

from mae_jax import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.config import model_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'variant=L/16,epochs=1600' -> ConfigDict, values typed like the defaults."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r}: expected key=value with key in "
                       f"{sorted(defaults)}")
    out[key] = type(defaults[key])(value)
  return ml_collections.ConfigDict(out)


def run_config(task: str, *, epochs: float, warmup_epochs: float, batch_size: int,
               base_lr: float) -> ml_collections.ConfigDict:
  """The fields every task's config has (the trainer reads them); unlocked."""
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  # Start from these weights instead of a random init (ignored when the workdir resumes):
  # an official .pth, a Hugging Face directory, or an mae_jax workdir / params checkpoint.
  config.init_from = ml_collections.config_dict.placeholder(str)
  config.eval_only = False  # True: evaluate the restored / init_from state, do not train

  config.input = ml_collections.ConfigDict()
  config.input.dataset = "imagenet2012"  # any tfds name, or 'folder' / 'demo' / 'digits'
  config.input.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir or root
  config.input.split = "train"
  config.input.eval_split = "validation"
  config.input.crop_scale = (0.2, 1.0)  # RandomResizedCrop, bicubic
  config.input.crop_ratio = (3 / 4, 4 / 3)
  config.input.hflip = True
  config.input.mean = IMAGENET_MEAN
  config.input.std = IMAGENET_STD
  config.input.worker_count = 16  # grain decoding processes per host
  config.input.worker_buffer_size = 2
  # Threads reading records ahead (None: 0 for in-memory sources, else 16) and how many records.
  config.input.read_threads = ml_collections.config_dict.placeholder(int)
  config.input.read_buffer = 64
  config.input.draft_decode = False  # True: reduced-size JPEG decode of large photos (faster)
  # uint8 batches, normalised inside the train step: a quarter of the bytes, no host float work.
  config.input.normalize_on_device = True

  # lr = base_lr * batch / 256, per-step warmup then cosine.
  config.batch_size = batch_size  # global, over all hosts and accumulation steps
  config.grad_accum_steps = 1
  config.epochs = epochs
  config.warmup_epochs = warmup_epochs
  config.total_steps = -1  # > 0 overrides epochs
  config.warmup_steps = -1  # >= 0 overrides warmup_epochs
  config.stop_at_step = -1  # > 0: stop early with a checkpoint (e.g. job time limits)
  config.base_lr = base_lr
  config.lr = -1.0  # > 0 sets the absolute peak lr instead of the scaling rule

  # Parallelism: data parallel over all devices; fsdp > 1 also shards params/optimizer
  # (inside a slice). num_slices: TPU slices joined by the data-center network; 0 = as the
  # devices say (their slice_index); devices without one (CPU) are split into N groups.
  config.fsdp = 1
  config.num_slices = 0

  # Outputs.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  # Evaluators (mae_jax/evals): each runs every `every_steps` steps and at the end.
  config.evals = ml_collections.ConfigDict()

  # Start-up and diagnostics; free to change when a run resumes.
  # XLA's persistent compilation cache (mae_jax/compile_cache.py): None for
  # $JAX_COMPILATION_CACHE_DIR or ~/.cache/mae_jax/xla, '' for off, or a directory (on
  # several hosts one they all see: only process 0 writes entries).
  config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
  # A jax.profiler trace of `steps` train steps from `first_step` (numbered as the logs do)
  # into WORKDIR/tensorboard/plugins/profile/ (mae_jax/profiling.py), on process 0 or on
  # every process; read it with `python -m mae_jax.trace_report WORKDIR`.
  config.profile = ml_collections.ConfigDict(dict(steps=0, first_step=10,
                                                  all_processes=False))
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, variant="B/16", epochs=800)
  config = run_config("pretrain", epochs=args.epochs, warmup_epochs=40, batch_size=4096,
                      base_lr=1.5e-4)
  # The model: every ModelConfig field of the variant, so each is overridable
  # (--config.model.mask_ratio=0.5); pick the variant with the argument (:variant=L/16).
  model = model_config(args.variant, mask_ratio=0.75, norm_pix_loss=True, decoder_width=512,
                       decoder_depth=8, decoder_num_heads=16, dtype="bfloat16")
  config.model = ml_collections.ConfigDict(model.to_dict())
  # Optimisation (paper Table 8): AdamW (0.9, 0.95), weight decay 0.05.
  config.weight_decay = 0.05
  config.b1 = 0.9
  config.b2 = 0.95
  config.evals.reconstruction = dict(type="reconstruction", num_images=8,
                                     every_steps=20 * 312)  # ~every 20 epochs at batch 4096
  return config.lock()
