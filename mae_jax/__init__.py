"""mae_jax: Masked Autoencoders (He et al., CVPR 2022) in JAX/Flax."""
from mae_jax import backends

backends.skip_absent_tpu()  # before JAX picks its backends: no libtpu chatter without a TPU

from mae_jax.config import ModelConfig, model_config
from mae_jax.imagenet import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.mae import MAEOutput, encode, init_params, mae_apply
from mae_jax.masking import random_masking
from mae_jax.patches import patchify, unpatchify

__all__ = ["ModelConfig", "model_config", "MAEOutput", "encode", "init_params", "mae_apply",
           "random_masking", "patchify", "unpatchify", "load_pretrained", "IMAGENET_MEAN",
           "IMAGENET_STD"]


def __getattr__(name):
  # load_pretrained pulls in the checkpoint readers; import them only when asked for.
  if name == "load_pretrained":
    from mae_jax.weights import load_pretrained
    return load_pretrained
  raise AttributeError(f"module 'mae_jax' has no attribute {name!r}")
