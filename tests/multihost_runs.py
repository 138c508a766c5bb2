"""Runs a list of mae_jax runs one after another as one of N JAX processes on localhost.

    python tests/multihost_runs.py SPEC.json PROCESS_ID

SPEC: {"coordinator": "localhost:PORT", "num_processes": N, "runs": [{"config":
"configs/digits.py:task=linear_probe", "overrides": {"init_from": ...}, "workdir": ...}]}.
tests/test_multihost.py starts it N times, so that each JAX process (and its gloo
collectives) starts once for many runs; each run is exactly `train_and_evaluate`, what
`python -m mae_jax.main` runs.
"""
import importlib
import json
import logging
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_config(spec: str, overrides: dict):
  """'configs/digits.py:task=knn' + {'evals.knn.k': 5} -> the locked config. (test_train's
  set_fields, written again: importing test_train starts JAX's backend, and
  jax.distributed.initialize must come first.)"""
  path, _, arg = spec.partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  config = module.get_config(arg or None).unlock()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config.lock()


def main() -> None:
  spec = json.load(open(sys.argv[1]))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(spec["coordinator"], spec["num_processes"], int(sys.argv[2]))
  logging.getLogger("mae_jax").setLevel(logging.INFO)
  from mae_jax.trainer import train_and_evaluate  # after initialize, as main does
  for run in spec["runs"]:
    train_and_evaluate(load_config(run["config"], run.get("overrides", {})), run["workdir"])


if __name__ == "__main__":
  main()
