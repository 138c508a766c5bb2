"""ImageNet's per-channel pixel mean and standard deviation (of [0, 1] RGB pixels): the
normalisation the reference checkpoints expect and the default of every config.

  from mae_jax import IMAGENET_MEAN, IMAGENET_STD
"""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
