"""The raw-pixel baseline of the digits demo: a linear classifier on the pixels themselves.

  python benchmarks/digits_pixels.py

Same split and the same evaluation view (16x16, normalised) the digits configs use; the
classifier is scikit-learn's multinomial logistic regression (L2, C=1), trained to
convergence. Prints test top-1.
"""
import numpy as np
from sklearn.linear_model import LogisticRegression

from configs import digits
from mae_jax.data import pipeline


def pixels(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  rows = [b for b in pipeline.make_eval_loader(config.input, split, image_size=16,
                                               global_batch_size=256, process_index=0,
                                               process_count=1)]
  valid = np.concatenate([b["valid"] for b in rows]) == 1
  x = np.concatenate([b["image"][..., 0].reshape(len(b["image"]), -1) for b in rows])[valid]
  return x, np.concatenate([b["label"] for b in rows])[valid]


def main():
  config = digits.get_config("task=linear_probe")
  x_train, y_train = pixels(config, "train")
  x_test, y_test = pixels(config, "test")
  clf = LogisticRegression(max_iter=5000).fit(x_train, y_train)
  print(f"raw pixels, logistic regression: train {len(y_train)}, test {len(y_test)}, "
        f"test top-1 {clf.score(x_test, y_test):.4f}")


if __name__ == "__main__":
  main()
