"""`python -m mae_jax.convert SRC DST`: writes MAE weights as an mae_jax Orbax params checkpoint.

SRC is anything `mae_jax.weights.load_pretrained` reads: an official MAE `.pth`, a Hugging Face
ViTMAE directory, an mae_jax workdir (its newest step) or params checkpoint. A source that does
not say its whole architecture (a `.pth` holds no head count) takes it from the flags
(`--variant B/16`, `--num_heads N`, one per ModelConfig field), checked against the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import sys
from typing import Sequence

import jax

from mae_jax import checkpointing, storage
from mae_jax.config import FIELDS, VARIANTS, ModelConfig, model_config
from mae_jax.weights.read import load_pretrained

__all__ = ["add_config_flags", "config_from_flags", "load_pretrained", "main"]


def _parse_bool(text: str) -> bool:
  if text.lower() not in ("true", "false", "1", "0"):
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
  return text.lower() in ("true", "1")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
  """--variant and one flag per ModelConfig field, for sources whose config is incomplete."""
  parser.add_argument("--variant", choices=list(VARIANTS),
                      help="base config the overrides below apply to (default B/16 when any "
                           "override is given); without both, the file's architecture is used")
  for field in dataclasses.fields(ModelConfig):
    kind = type(field.default)
    parser.add_argument(f"--{field.name}", type=_parse_bool if kind is bool else kind,
                        help=f"model config override ({kind.__name__})")


def config_from_flags(args: argparse.Namespace) -> ModelConfig | None:
  """The config the flags of `add_config_flags` ask for, or None when none is given."""
  overrides = {k: getattr(args, k) for k in FIELDS if getattr(args, k) is not None}
  return model_config(args.variant or "B/16", **overrides) if args.variant or overrides else None


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m mae_jax.convert SRC DST`: writes SRC's weights as an Orbax params checkpoint."""
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.convert",
      description="Convert an official MAE .pth, a Hugging Face ViTMAE directory or an mae_jax "
                  "checkpoint into an mae_jax Orbax params checkpoint.")
  parser.add_argument("src", help="weights to read")
  parser.add_argument("dst", help="Orbax checkpoint directory to create (never overwritten)")
  add_config_flags(parser)
  args = parser.parse_args(argv)
  try:
    storage.check(args.dst, "DST")
    if storage.path(args.dst).exists():
      parser.exit(2, f"error: {args.dst} exists; refusing to overwrite it\n")  # as argparse
    src = args.src
    storage.check(src, "SRC")
    if (checkpointing.is_orbax_dir(src)
        and not (storage.path(src) / "config").is_dir()):  # a workdir: its newest step
      src = checkpointing.latest_step_dir(src)
      print(f"reading step {src.name} of {args.src}")
    params, config = load_pretrained(src, config_from_flags(args))
  except (ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
    parser.exit(1, f"error: {e}\n")
  checkpointing.save_params(args.dst, params, config)
  counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()}
  print(f"wrote {args.dst}: {sum(counts.values()):,} parameters ("
        + ", ".join(f"{k} {n:,}" for k, n in counts.items()) + ")")
  print(f"config: {config.to_dict()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
