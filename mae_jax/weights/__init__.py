"""Weight I/O in one place: `read.read(path)` and `write.write(weights, fmt, dst)`, every format.

  names.py      one table: our params <-> the reference's names <-> the hub's (MAE, classifier)
  torch_zip.py  torch.save's zip format: the restricted reader and the writer
  hf_config.py  Hugging Face config.json (ViTMAE, ViT), both directions
  preprocess.py the evaluation view as an image processor / timm pretrained_cfg
  read.py       read(path) -> Weights: what a source holds, recognised once; load_pretrained
  write.py      write(weights, fmt, dst): weights, config, class names and preprocessing
"""
from mae_jax.weights.read import Weights, load_pretrained

__all__ = ["Weights", "load_pretrained"]
