"""`python -m mae_jax.export SRC DST --format {hf,timm,official}`: weights for other code.

SRC is anything `mae_jax.weights.read` recognises: an MAE (a pretraining workdir, an Orbax
params checkpoint, an official `.pth`, a Hugging Face ViTMAE directory) or a classifier (a
fine-tuning workdir or its best/, a linear-probe workdir, an official fine-tuned `.pth`, a
ViTForImageClassification directory). The formats and what each holds: `mae_jax.weights.write`.
Every problem is one line on stderr (exit status 1) before anything is written; DST is never
overwritten.
"""
from __future__ import annotations

import argparse
import pickle
import sys
from typing import Sequence

import jax

from mae_jax import convert
from mae_jax.config import FIELDS
from mae_jax.weights import read, write

# Flags a classifier source may take: what a fine-tuned .pth cannot say.
CLASSIFIER_FLAGS = ("num_heads", "layer_norm_eps")


def _check_classifier_flags(weights: read.Weights, args: argparse.Namespace) -> None:
  """A classifier's sizes come from its weights; heads and eps only where the source is
  silent (a .pth), else they must agree with it."""
  sizes = [f"--{k}" for k in ("variant",) + FIELDS
           if k not in CLASSIFIER_FLAGS and getattr(args, k) is not None]
  if sizes:
    raise ValueError(f"{args.src} is a fine-tuned classifier, whose sizes come from its "
                     f"weights: {', '.join(sizes)} cannot apply (--num_heads and "
                     f"--layer_norm_eps can, where a .pth does not say them)")
  for name in CLASSIFIER_FLAGS:
    given, value = getattr(args, name), getattr(weights.config, name)
    if given is not None and name in weights.stated and given != value:
      raise ValueError(f"{args.src} is a classifier with {name} {value}, --{name} says {given}")


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m mae_jax.export SRC DST --format F`: writes SRC's weights for other code."""
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.export",
      description="Export MAE weights (a workdir, an Orbax params checkpoint, an official .pth, "
                  "a Hugging Face directory) or a classifier (a fine-tuning workdir or its "
                  "best/, a linear-probe workdir, an official fine-tuned .pth, a "
                  "ViTForImageClassification directory) to the Hugging Face, timm or official "
                  "format, with its class names and preprocessing.")
  parser.add_argument("src", help="weights to read")
  parser.add_argument("dst", help="directory (hf, timm) or .pth file (official) to create; "
                                  "never overwritten")
  parser.add_argument("--format", required=True, choices=write.FORMATS, dest="fmt")
  parser.add_argument("--encoder_only", action="store_true",
                      help="export an MAE's encoder alone (hf: ViTMAEModel); timm needs it")
  convert.add_config_flags(parser)
  args = parser.parse_args(argv)
  try:
    write.check_dst(args.dst)  # before reading anything
    weights = read.read(args.src, convert.config_from_flags(args), num_heads=args.num_heads,
                        layer_norm_eps=args.layer_norm_eps)
    if weights.kind == "classifier":
      _check_classifier_flags(weights, args)
    dst = write.write(weights, args.fmt, args.dst, args.encoder_only)
  except (ValueError, FileNotFoundError, FileExistsError, pickle.UnpicklingError) as e:
    parser.exit(1, f"error: {e}\n")
  if weights.kind == "classifier":
    count = sum(x.size for x in jax.tree.leaves(weights.params))
    probe = ", a linear probe: its BatchNorm folded into the head" if (
        weights.task == "linear_probe") else ""
    print(f"wrote {dst} ({args.fmt}, classifier: {weights.num_classes} classes, pool "
          f"{weights.pool!r}{probe}): {count:,} parameters")
  else:
    kept = ("encoder",) if args.encoder_only else ("encoder", "decoder")
    count = sum(x.size for k in kept for x in jax.tree.leaves(weights.params[k]))
    print(f"wrote {dst} ({args.fmt}, {' + '.join(kept)}): {count:,} parameters")
  print(f"load with: {write.how_to_load(weights, args.fmt, args.dst, args.encoder_only)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
