"""Every task on 2 processes x 2 devices (gloo on localhost) against 1 process: pretraining
with its evaluators, the linear probe, fine-tuning, kNN, `eval_only` of each, `init_from`
from every source, runs resumed on another number of processes (after SIGTERM too), and
checkpoints written by 2 processes read by 1.

The 1-process runs happen in this test process (8 devices); the 2-process runs go through
tests/multihost_runs.py, which starts JAX once per process for all of them. All on the
digits (16 px, a 4-block ViT), so each run takes seconds.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mae_jax.checkpointing import load_params
from mae_jax.trainer import train_and_evaluate

from multihost_runs import load_config
from test_train import without_key_bias

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ("configs/digits.py:steps=24", {
    "checkpoint_every_steps": 8, "log_every_steps": 4, "evals.reconstruction.every_steps": 0,
    "evals.knn.every_steps": 0})
PROBE = ("configs/digits.py:task=linear_probe,steps=12", {"log_every_steps": 4})
FINETUNE = ("configs/digits.py:task=finetune,steps=12", {
    "log_every_steps": 4, "evals.classification.every_steps": 6})
KNN = ("configs/digits.py:task=knn", {})


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_processes(runs, tmp, num_processes=2, devices=2):
  """Starts tests/multihost_runs.py as `num_processes` processes; returns them and logs."""
  spec = os.path.join(tmp, f"spec_{free_port()}.json")
  json.dump({"coordinator": f"localhost:{free_port()}", "num_processes": num_processes,
             "runs": runs}, open(spec, "w"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  logs = [os.path.join(tmp, f"{os.path.basename(spec)}.{i}.log") for i in range(num_processes)]
  procs = [subprocess.Popen([sys.executable, "tests/multihost_runs.py", spec, str(i)], cwd=ROOT,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
           for i, log in enumerate(logs)]
  return procs, logs


def run_processes(runs, tmp, **kwargs):
  procs, logs = start_processes(runs, tmp, **kwargs)
  for proc, log in zip(procs, logs):
    assert proc.wait(timeout=900) == 0, open(log).read()[-4000:]
  return [open(log).read() for log in logs]


def run(spec, workdir, **overrides):
  return {"config": spec[0], "overrides": {**spec[1], **overrides}, "workdir": workdir}


def train(spec, workdir, **overrides):
  """The same run in this process."""
  r = run(spec, workdir, **overrides)
  return train_and_evaluate(load_config(r["config"], r["overrides"]), workdir)


def results(workdir):
  return json.load(open(os.path.join(workdir, "results.json")))


def logged(workdir, key="loss"):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r[key] for r in rows if key in r}


def close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(without_key_bias(path, np.asarray(x)),
                               without_key_bias(path, np.asarray(y)), rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 1-process runs here, then the 2-process runs, all in one folder: {name: workdir}."""
  tmp = str(tmp_path_factory.mktemp("multihost"))
  d = {name: os.path.join(tmp, name) for name in (
      "pre1", "pre2", "resumed", "probe1", "probe2", "probe_eval", "probe_pth", "probe_hf",
      "ft1", "ft2", "ft_eval", "knn1", "knn2")}
  train(PRETRAIN, d["pre1"])
  train(PRETRAIN, d["resumed"], stop_at_step=12)  # continued below on 2 processes
  train(PROBE, d["probe1"], init_from=d["pre1"])
  train(FINETUNE, d["ft1"], init_from=d["pre1"])
  train(KNN, d["knn1"], init_from=d["pre1"])
  shutil.copytree(d["probe1"], d["probe_eval"])  # evaluated again below, from 2 processes
  pth, hf = os.path.join(tmp, "pre1.pth"), os.path.join(tmp, "pre1_hf")
  for fmt, dst in (("official", pth), ("hf", hf)):
    subprocess.run([sys.executable, "-m", "mae_jax.export", d["pre1"], dst, "--format", fmt],
                   cwd=ROOT, check=True, capture_output=True)
  d["logs"] = run_processes([
      run(PRETRAIN, d["resumed"]),
      run(PRETRAIN, d["pre2"]),
      run(PROBE, d["probe2"], init_from=d["pre1"]),
      run(PROBE, d["probe_eval"], init_from=d["pre1"], eval_only=True),
      run(PROBE, d["probe_pth"], init_from=pth),
      run(PROBE, d["probe_hf"], init_from=hf),
      run(FINETUNE, d["ft2"], init_from=d["pre1"]),
      run(FINETUNE, d["ft_eval"], init_from=os.path.join(d["ft1"], "best"), eval_only=True),
      run(KNN, d["knn2"], init_from=d["pre1"]),
  ], tmp)
  return d


# Observed between 1 process x 8 devices and 2 x 2: up to ~1e-6 on the params after 24 steps
# (float reduction order); runs fed other records differ by ~lr (3e-4 here) per step.
PARAMS_ATOL = 2e-5


def test_pretraining_on_two_processes_equals_one(runs):
  one, _ = load_params(runs["pre1"])
  two, _ = load_params(runs["pre2"])  # written by 2 processes, read by this one
  close(two, one, PARAMS_ATOL)
  assert logged(runs["pre2"]).keys() == logged(runs["pre1"]).keys() == {4, 8, 12, 16, 20, 24}
  np.testing.assert_allclose(list(logged(runs["pre2"]).values()),
                             list(logged(runs["pre1"]).values()), rtol=1e-5)
  # The evaluators during training: kNN over every test digit once, the same top-1; the grid.
  assert results(runs["pre2"])["knn/count"] == results(runs["pre1"])["knn/count"] == 360
  assert results(runs["pre2"])["knn/top1"] == results(runs["pre1"])["knn/top1"]
  assert "step_00000024.png" in os.listdir(os.path.join(runs["pre2"], "reconstructions"))


def test_a_run_stopped_on_one_process_continues_on_two(runs):
  resumed, _ = load_params(runs["resumed"])
  one, _ = load_params(runs["pre1"])
  close(resumed, one, PARAMS_ATOL)
  assert "resumed from step 12" in runs["logs"][0]


def test_linear_probe_on_two_processes_equals_one(runs):
  one, two = results(runs["probe1"]), results(runs["probe2"])
  assert one["classification/count"] == two["classification/count"] == 360
  assert one["classification/top1"] == two["classification/top1"]
  np.testing.assert_allclose(list(logged(runs["probe2"]).values()),
                             list(logged(runs["probe1"]).values()), rtol=1e-4)


def test_init_from_an_official_pth_and_a_hugging_face_dir_on_two_processes(runs):
  """The exports of the 1-process MAE hold its weights: probes started from them on 2
  processes train as the one started from the workdir."""
  for name in ("probe_pth", "probe_hf"):
    np.testing.assert_allclose(list(logged(runs[name]).values()),
                               list(logged(runs["probe1"]).values()), rtol=1e-4)
    assert results(runs[name])["classification/top1"] == results(runs["probe1"])[
        "classification/top1"]


def test_eval_only_of_a_one_process_workdir_on_two_processes(runs):
  assert results(runs["probe_eval"]) == results(runs["probe1"])
  # The evaluation keeps the run's own config.json (an evaluation changes nothing in the run).
  assert json.load(open(os.path.join(runs["probe_eval"], "config.json")))["eval_only"] is False


def test_finetuning_on_two_processes_equals_one(runs):
  one, two = results(runs["ft1"]), results(runs["ft2"])
  assert one["classification/count"] == two["classification/count"] == 360
  assert abs(one["classification/top1"] - two["classification/top1"]) <= 2 / 360
  np.testing.assert_allclose(list(logged(runs["ft2"]).values()),
                             list(logged(runs["ft1"]).values()), rtol=1e-4)
  assert os.listdir(os.path.join(runs["ft2"], "best")) == os.listdir(
      os.path.join(runs["ft1"], "best"))


def test_eval_only_of_a_finetuned_best_checkpoint_on_two_processes(runs):
  best = os.path.join(runs["ft1"], "best")
  [step] = os.listdir(best)
  saved = json.load(open(os.path.join(best, step, "config", "metadata")))["best"]
  assert results(runs["ft_eval"])["classification/top1"] == saved["classification/top1"]


def test_knn_on_two_processes_equals_one(runs):
  one, two = results(runs["knn1"]), results(runs["knn2"])
  assert one["knn/count"] == two["knn/count"] == 360
  assert one["knn/top1"] == two["knn/top1"] and one["knn/top5"] == two["knn/top5"]


def test_sigterm_on_two_processes_saves_and_one_process_continues(runs, tmp_path):
  """Preemption of a 2-process run (with a grain worker per host): both save the same step
  and exit cleanly; one process without workers continues it to the run that never
  stopped."""
  workdir = str(tmp_path / "preempted")
  procs, logs = start_processes([run(PRETRAIN, workdir, **{
      "input.worker_count": 1, "checkpoint_every_steps": 4})], str(tmp_path))
  first = os.path.join(workdir, "checkpoints", "4")
  start = time.time()
  while not os.path.isdir(first):
    assert all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
    assert time.time() - start < 600, "no checkpoint appeared"
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  for p, log in zip(procs, logs):
    assert p.wait(timeout=300) == 0, open(log).read()[-3000:]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert 4 <= steps[-1] < 24, "the run was not interrupted before its end"
  for log in logs:
    assert f"preempted (SIGTERM): saved step {steps[-1]}" in open(log).read()
  train(PRETRAIN, workdir)
  close(load_params(workdir)[0], load_params(runs["pre1"])[0], PARAMS_ATOL)


def test_export_and_visualize_a_workdir_two_processes_wrote(runs, tmp_path):
  from mae_jax import load_pretrained
  dst, png = str(tmp_path / "hf"), str(tmp_path / "grid.png")
  for command in (["mae_jax.export", runs["pre2"], dst, "--format", "hf"],
                  ["mae_jax.visualize", runs["pre2"], png, "--num_images", "2"]):
    proc = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
  exported, _ = load_pretrained(dst)
  saved, _ = load_params(runs["pre2"])
  close(exported, saved, atol=0)
  assert os.path.getsize(png) > 0
