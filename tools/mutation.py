"""Mutation testing of the pure modules against their fast tests (cosmic-ray; not in CI).

    pip install -e ".[mutation]"
    python tools/mutation.py                    # every module below, one after the other
    python tools/mutation.py losses masking     # some of them
    python tools/mutation.py --survivors losses # again, only the mutants that survived

Each module is mutated in a throwaway copy of the working tree (build/mutation/src: a run
that is stopped never leaves a mutant in yours), one mutant at a time, against only the fast
tests that cover it, stopping at the first failure (`-x`), with one XLA compilation cache for
all runs. Sessions are kept in build/mutation/<module>.sqlite (`cr-report` and `cr-html` read
them); at the end each module's figures are printed with the diff of every surviving mutant.
docs/mutation.md has the figures and the review of the survivors.

Speed: importing JAX, flax, torch and pytest takes most of a small test run (5-15 s on a
loaded 2-core machine). A fork server imports those third-party packages once, before JAX
starts any thread; cosmic-ray's test command is a small client that has the server fork a
child which runs pytest on the mutated tree (mae_jax itself is imported fresh in each child).

Operators: cosmic-ray's core set, except that a binary, comparison or unary operator is
replaced only by its natural counterpart (+ by -, * by /, < by <=, `is` by `is not`, -x by
x, ...), as mutmut does, instead of by every other operator: `a * b` -> `a << b` or `a ^ b`
is killed by any test that runs the line, and the 12-way replacements made 3 of 4 mutants.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "build", "mutation")

def tests(path: str, *names: str) -> list[str]:
  return [f"tests/{path}::test_{name}" for name in names]


# module -> (the fast tests that cover it, quickest first; the functions to mutate (None: all)).
# EvalData and KnnEvaluator read splits onto a mesh: the trainer's tests cover them.
MODULES = {
    "losses": (tests("test_model.py", "loss_hand_computed",
                     "loss_averages_every_removed_patch_and_is_0_with_none"), None),
    "masking": (tests("test_model.py", "masking_rejects_bad_ratio", "masking_errors",
                      "masking_follows_argsort_rule_for_given_noise",
                      "masking_counts_and_randomness"), None),
    "patches": (tests("test_model.py", "patchify_round_trip_and_order",
                      "patchify_rejects_indivisible"), None),
    "posemb": (tests("test_model.py", "sincos_2d_values"), None),
    "optim": (tests("test_train.py", "lr_schedule_needs_warmup_inside_the_run",
                    "optimizer_hyperparameters_are_keyword_only") +
              tests("test_eval.py", "lars_matches_the_reference_under_a_changing_lr") +
              tests("test_finetune.py", "adamw_with_layer_decay_matches_torch_param_groups") +
              tests("test_train.py", "lr_schedule_matches_recipe",
                    "run_optimizer_is_the_papers_adamw", "weight_decay_mask_matches_recipe"),
              None),
    "mixup": (tests("test_finetune.py", "cutmix_box_is_timms_rand_bbox",
                    "cutmix_box_of_a_sliver_is_empty",
                    "mixed_labels_sum_to_one_and_equal_the_pasted_fraction",
                    "mix_batch_applies_with_prob_and_switches_with_switch_prob"), None),
    "data/randaugment": (tests("test_finetune.py", "randaugment_spec_and_fill",
                               "random_erasing_edges_as_timm",
                               "randaugment_ops_are_timms_at_their_level",
                               "randaugment_applies_each_op_with_probability_half_at_a_normal_"
                               "magnitude", "random_erasing_boxes_follow_timms_ranges",
                               "randaugment_and_random_erasing_are_deterministic_and_keep_shape_"
                               "and_dtype"), None),
    "evals/common": (tests("test_eval.py", "padding_rows_scored_for_class_0_count_for_nothing",
                           "top5_is_the_five_highest_scores",
                           "eval_loader_over_two_hosts_sees_every_example_once"),
                     ("topk_correct", "accuracies")),
    "evals/knn": (tests("test_eval.py", "knn_votes_by_hand"), ("knn_scores",)),
    "classifier": (tests("test_finetune.py",
                         "interpolated_position_embeddings_keep_the_cls_row_and_match_torch",
                         "layer_decay_scales_and_weight_decay_mask_parameter_by_parameter"),
                   ("layer_id", "interpolate_pos_embed", "_bicubic_matrix")),
}

# Operators replaced only by their natural counterpart (the left side of each pair).
COUNTERPART = {
    "ReplaceBinaryOperator": {"Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Div",
                              "Mod_FloorDiv", "Pow_Mul", "BitAnd_BitOr", "BitOr_BitAnd",
                              "BitXor_BitAnd", "LShift_RShift", "RShift_LShift", "MatMult_Mul"},
    "ReplaceComparisonOperator": {"Lt_LtE", "LtE_Lt", "Gt_GtE", "GtE_Gt", "Eq_NotEq", "NotEq_Eq",
                                  "Is_IsNot", "IsNot_Is", "In_NotIn", "NotIn_In"},
}


def kept_operator(name: str) -> bool:
  """Whether a cosmic-ray operator ('core/ReplaceBinaryOperator_Mul_Div') is in our set."""
  kind, _, pair = name.removeprefix("core/").partition("_")
  if kind in COUNTERPART:
    return pair in COUNTERPART[kind]
  if kind == "ReplaceUnaryOperator":
    return pair.startswith("Delete_")  # -x -> x, not x -> x; never -x -> ~x or `not x`
  return True


def function_lines(path: str, names: tuple[str, ...]) -> list[tuple[int, int]]:
  """(first, last) line of each named top-level function of a source file."""
  tree = ast.parse(open(path).read())
  found = {n.name: (n.lineno, n.end_lineno) for n in tree.body if isinstance(n, ast.FunctionDef)}
  missing = set(names) - set(found)
  if missing:
    raise SystemExit(f"tools/mutation.py: {path} has no function {sorted(missing)}")
  return [found[n] for n in names]


def copy_tree(dst: str) -> None:
  """The working tree's files that git knows of (tracked or not ignored) into `dst`."""
  shutil.rmtree(dst, ignore_errors=True)
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode().split("\0")
  for f in filter(None, files):
    if os.path.isfile(os.path.join(ROOT, f)):
      os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


# --- The fork server and its client ------------------------------------------------------------
# Third-party packages the tests import; none starts a thread on import (checked at start).
PRELOAD = ("jax", "jax.numpy", "numpy", "flax.linen", "optax", "orbax.checkpoint", "grain",
           "ml_collections", "chex", "PIL.Image", "scipy.special", "torch", "transformers",
           "tensorflow_datasets", "pytest")
TEST_TIMEOUT_S = 300


def serve(path: str, src: str) -> None:
  """Runs pytest for each request (a JSON list of arguments) in a forked child in `src`,
  answering its exit status (124: timed out) and the end of its output."""
  import importlib
  import threading
  for name in PRELOAD:
    importlib.import_module(name)
  if threading.active_count() > 1:
    raise SystemExit("tools/mutation.py: a preloaded package started a thread: forking is unsafe")
  os.chdir(src)
  sys.path.insert(0, src)
  server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  server.bind(path)
  server.listen(1)
  while True:
    connection, _ = server.accept()
    with connection:
      args = json.loads(connection.makefile().readline())
      log = os.path.join(WORK, "last_test_output.txt")
      child = os.fork()
      if child == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        import pytest
        os._exit(int(pytest.main(args)))
      deadline = time.monotonic() + TEST_TIMEOUT_S
      while (done := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
      if done[0] == 0:
        os.kill(child, 9)
        os.waitpid(child, 0)
        status = 124
      else:
        status = os.waitstatus_to_exitcode(done[1])
      output = open(log, errors="replace").read()[-4000:]
      connection.sendall((json.dumps([status, output]) + "\n").encode())


def client(path: str, args: list[str]) -> None:
  """cosmic-ray's test command: the server's pytest run of `args`; exits with its status."""
  with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
    connection.connect(path)
    connection.sendall((json.dumps(args) + "\n").encode())
    status, output = json.loads(connection.makefile().readline())
  print(output)
  sys.exit(status)


def start_server(path: str, src: str, env: dict[str, str]) -> subprocess.Popen:
  if os.path.exists(path):
    os.remove(path)
  server = subprocess.Popen([sys.executable, __file__, "--serve", path, src], env=env)
  while not os.path.exists(path):
    if server.poll() is not None:
      raise SystemExit("tools/mutation.py: the fork server did not start")
    time.sleep(0.2)
  return server


# --- cosmic-ray sessions -------------------------------------------------------------------------
def config(module: str, tests: list[str], path: str) -> str:
  command = " ".join([sys.executable, __file__, "--client", path, "-q", "-x",
                      "-p", "no:cacheprovider", "-p", "no:xdist", *tests])
  return (f'[cosmic-ray]\nmodule-path = "mae_jax/{module}.py"\ntimeout = 600.0\n'
          f'excluded-modules = []\ntest-command = "{command}"\n'
          '[cosmic-ray.distributor]\nname = "local"\n')


def skip_unwanted(session: str, lines: list[tuple[int, int]] | None) -> None:
  """Marks skipped the mutants of excluded operators and those outside `lines`."""
  from cosmic_ray.work_db import WorkDB, use_db
  from cosmic_ray.work_item import WorkerOutcome, WorkResult
  with use_db(session, WorkDB.Mode.open) as db:
    for item in list(db.pending_work_items):
      m = item.mutations[0]
      inside = lines is None or any(a <= m.start_pos[0] <= b for a, b in lines)
      if not (kept_operator(m.operator_name) and inside):
        db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED,
                                              output="not in tools/mutation.py's set"))


def forget_survivors(session: str) -> None:
  """Makes the surviving mutants pending again (to run them against new tests)."""
  from cosmic_ray.work_item import TestOutcome
  with sqlite3.connect(session) as db:
    db.execute("DELETE FROM work_results WHERE test_outcome IN (?, ?)",
               (TestOutcome.SURVIVED.name, TestOutcome.SURVIVED.value))


def report(module: str, session: str) -> tuple[int, int]:
  """Prints the figures and the diff of each survivor (and of each mutant whose run went
  wrong, counted in neither figure); returns (killed, tested)."""
  from cosmic_ray.work_db import WorkDB, use_db
  from cosmic_ray.work_item import TestOutcome, WorkerOutcome
  killed = tested = 0
  shown = []
  with use_db(session, WorkDB.Mode.open) as db:
    for item, result in db.completed_work_items:
      if result.worker_outcome == WorkerOutcome.SKIPPED:
        continue
      m = item.mutations[0]
      if result.test_outcome in (TestOutcome.KILLED, TestOutcome.SURVIVED):
        tested += 1
        killed += result.test_outcome == TestOutcome.KILLED
      if result.test_outcome != TestOutcome.KILLED:
        outcome = result.test_outcome or result.worker_outcome
        shown.append(f"--- {outcome.value}: {item.job_id} {m.operator_name} "
                     f"line {m.start_pos[0]}\n{result.diff or result.output}")
  print(f"{module}: {killed} of {tested} mutants killed "
        f"({100 * killed / max(tested, 1):.1f}%), {tested - killed} survived", flush=True)
  for s in shown:
    print(s, flush=True)
  return killed, tested


def main() -> None:
  if sys.argv[1:2] == ["--client"]:
    return client(sys.argv[2], sys.argv[3:])
  if sys.argv[1:2] == ["--serve"]:
    return serve(sys.argv[2], sys.argv[3])
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("modules", nargs="*", default=list(MODULES), choices=list(MODULES),
                      metavar="MODULE")
  parser.add_argument("--survivors", action="store_true",
                      help="run again only the mutants that survived the last run")
  args = parser.parse_args()
  src = os.path.join(WORK, "src")
  copy_tree(src)
  # As tests/conftest.py sets them, before the server imports JAX.
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(WORK, "xla_cache"),
         "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  socket_path = os.path.join(WORK, "server.sock")
  server = start_server(socket_path, src, env)
  cosmic = [os.path.join(os.path.dirname(sys.executable), "cosmic-ray")]
  totals = [0, 0]
  try:
    for module in args.modules:
      tests, functions = MODULES[module]
      name = module.replace("/", "_")
      cfg, session = os.path.join(WORK, f"{name}.toml"), os.path.join(WORK, f"{name}.sqlite")
      with open(cfg, "w") as f:
        f.write(config(module, tests, socket_path))
      if args.survivors and os.path.exists(session):
        forget_survivors(session)
      else:
        if os.path.exists(session):
          os.remove(session)
        subprocess.run([*cosmic, "init", cfg, session], cwd=src, env=env, check=True)
        lines = function_lines(os.path.join(src, "mae_jax", f"{module}.py"), functions) \
            if functions else None
        skip_unwanted(session, lines)
      subprocess.run([*cosmic, "exec", cfg, session], cwd=src, env=env, check=True)
      killed, tested = report(module, session)
      totals[0] += killed
      totals[1] += tested
  finally:
    server.terminate()
  if len(args.modules) > 1:
    print(f"all: {totals[0]} of {totals[1]} killed ({100 * totals[0] / max(totals[1], 1):.1f}%)")


if __name__ == "__main__":
  main()
