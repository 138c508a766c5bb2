"""Input pipeline: tfds / image-folder / demo sources read with grain."""
from mae_jax.data.pipeline import make_eval_batch, make_train_loader, to_global_array
from mae_jax.data.sources import demo_source, folder_source, tfds_source

__all__ = ["make_train_loader", "make_eval_batch", "to_global_array",
           "demo_source", "folder_source", "tfds_source"]
