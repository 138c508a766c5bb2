"""Weighted kNN accuracy of a pretrained encoder (k = 20, T = 0.07, cosine), on its own:

  python -m mae_jax.main --config=configs/knn.py:variant=B/16 --config.init_from=PRETRAINED \
      --workdir=DIR

Features of the training split (evaluation view, no augmentation) form the bank; the
validation split is classified; top-1 / top-5 go to WORKDIR/results.json. Nothing is
trained. During pretraining the same evaluator is `config.evals.knn = dict(type='knn', ...)`.
"""
import ml_collections

from configs import linear_probe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = linear_probe.get_config(arg).unlock()
  config.task = "knn"
  config.eval_only = True
  config.evals = ml_collections.ConfigDict()
  config.evals.knn = dict(type="knn", k=20, temperature=0.07, pool="cls", batch_size=1024)
  return config.lock()
