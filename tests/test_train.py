"""Pretraining end to end: demo run, resume after kill / SIGTERM, grad accumulation,
schedule and weight decay, errors before writes, and a two-process run on localhost."""
import json
import re
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base, demo
from mae_jax import mae_apply, optim, sharding
from mae_jax.checkpointing import load_params
from mae_jax.data import demo as demo_data
from mae_jax.data import pipeline
from mae_jax.tasks.pretrain import PretrainTask, model_config_from
from mae_jax.trainer import (abstract_state, create_state, make_train_step, plan_run,
                             train_and_evaluate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny model on 32x32 crops of the demo photos: a step takes well under a second.
OVERRIDES = {
    "model.image_size": 32, "model.width": 64, "model.depth": 2, "model.num_heads": 4,
    "model.decoder_width": 32, "model.decoder_depth": 1, "model.decoder_num_heads": 4,
    "batch_size": 16, "total_steps": 200, "warmup_steps": 5, "log_every_steps": 2,
    "checkpoint_every_steps": 2, "evals.reconstruction.every_steps": 4,
    "evals.reconstruction.num_images": 2,
}
NO_RECON = {"evals.reconstruction.every_steps": -1}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("demo_cache"))
  demo_data.build_demo(path)
  return path


def config_with(demo_dir, **extra):
  config = demo.get_config().unlock()
  for key, value in {**OVERRIDES, "input.data_dir": demo_dir, **extra}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config.lock()


def main_command(workdir, demo_dir, **extra):
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "input.data_dir": demo_dir,
                                             **extra}.items()]
  return [sys.executable, "-m", "mae_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", *flags]


def params_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_demo_end_to_end(tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  state = train_and_evaluate(config_with(demo_dir, stop_at_step=4), workdir)
  assert int(state["step"]) == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["images_per_s"] > 0
  assert rows[1]["lr"] > 0 and rows[1]["param_norm"] > 0
  assert {"eta_s", "grad_norm", "step_time_s", "epoch", "data_skipped"} <= set(rows[1])
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert os.listdir(os.path.join(workdir, "reconstructions")) == ["step_00000004.png"]
  params, model = load_params(workdir)  # the final checkpoint serves evaluation
  assert model == model_config_from(config_with(demo_dir))
  assert params_equal(params, state["params"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, demo_dir):
  """Params after 20 steps of an uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return train_and_evaluate(config_with(demo_dir, stop_at_step=20), workdir)["params"]


def wait_for_checkpoint(workdir, proc, step, timeout=240):
  done = os.path.join(workdir, "checkpoints", str(step))
  start = time.time()
  while not os.path.isdir(done):
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() - start < timeout, "no checkpoint appeared"
    time.sleep(0.02)


def latest_step(workdir):
  return max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_matches_uninterrupted_run(tmp_path, demo_dir, reference_run, sig):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(main_command(workdir, demo_dir, stop_at_step=20), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wait_for_checkpoint(workdir, proc, 2)
  proc.send_signal(sig)
  output = proc.communicate(timeout=120)[0]
  interrupted_at = latest_step(workdir)
  if sig == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL
  else:  # preemption: a checkpoint at the current step, then a clean exit
    assert proc.returncode == 0, output[-3000:]
    assert "preempted (SIGTERM): saved step" in output
  assert 2 <= interrupted_at < 20, "the run was not interrupted before its end"
  resumed = train_and_evaluate(config_with(demo_dir, stop_at_step=20), workdir)
  assert int(resumed["step"]) == 20
  # Bitwise: the same data order, masks and arithmetic as the run that never stopped.
  assert params_equal(resumed["params"], reference_run)


def test_grad_accumulation_matches_full_batch():
  """2 x B/2 micro-batches give the gradient, and so the update, of one step at B.

  Plain SGD makes the update the gradient itself (AdamW's first step is sign-like and
  would blow float rounding up on near-zero gradients); accumulation happens before the
  optimizer, so this covers AdamW too.
  """
  task = PretrainTask(config_with("unused"))
  mesh = sharding.make_mesh()
  images = jax.device_put(jax.random.normal(jax.random.key(1), (16, 32, 32, 3)),
                          sharding.batch_sharding(mesh))
  schedule = optax.constant_schedule(1.0)
  tx = optax.sgd(schedule)
  results = []
  for k in (1, 2):
    state = create_state(task, tx, jax.random.key(0), mesh)
    start = jax.device_get(state["params"])
    step = make_train_step(task, tx, schedule, mesh, abstract_state(task, tx),
                           grad_accum_steps=k)
    state, metrics = step(state, {"image": images})
    grads = jax.tree.map(lambda a, b: a - b, start, jax.device_get(state["params"]))
    results.append((grads, jax.device_get(metrics)))
  (g1, m1), (g2, m2) = results
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_fsdp_step_matches_data_parallel():
  task = PretrainTask(config_with("unused"))
  tx = optim.make_optimizer(optax.constant_schedule(1e-3), weight_decay=0.05, b1=0.9, b2=0.95)
  losses = []
  for fsdp in (1, 4):
    mesh = sharding.make_mesh(fsdp)
    state = create_state(task, tx, jax.random.key(0), mesh)
    if fsdp > 1:
      kernel = state["params"]["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
      assert "fsdp" in str(kernel.sharding.spec)
    step = make_train_step(task, tx, optax.constant_schedule(1e-3), mesh,
                           abstract_state(task, tx))
    images = jax.device_put(jax.random.normal(jax.random.key(1), (16, 32, 32, 3)),
                            sharding.batch_sharding(mesh))
    for _ in range(2):
      state, metrics = step(state, {"image": images})
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_lr_schedule_matches_recipe():
  config = base.get_config()
  assert config.batch_size == 4096 and config.base_lr == 1.5e-4
  assert (config.b1, config.b2, config.weight_decay) == (0.9, 0.95, 0.05)
  peak = optim.learning_rate(config.base_lr, config.batch_size)
  assert peak == pytest.approx(2.4e-3)
  steps_per_epoch, epochs, warmup_epochs = 312, 800, 40
  total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
  schedule = optim.lr_schedule(peak, warmup, total)
  for step in (0, 1, 1000, warmup - 1):  # per-step linear warmup from 0
    assert float(schedule(step)) == pytest.approx(peak * step / warmup, rel=1e-4, abs=1e-12)
  for step in (warmup, warmup + 12345, total - 7, total):  # half cosine to 0
    progress = (step - warmup) / (total - warmup)
    want = peak * 0.5 * (1 + np.cos(np.pi * progress))
    assert float(schedule(step)) == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_weight_decay_mask_matches_recipe():
  task = PretrainTask(config_with("unused"))
  params = jax.eval_shape(lambda: create_state(
      task, optax.identity(), jax.random.key(0), sharding.make_mesh())["params"])
  mask = optim.weight_decay_mask(params)
  enc, dec = mask["encoder"], mask["decoder"]
  assert enc["blocks_0"]["attn"]["qkv"]["kernel"] and dec["decoder_pred"]["kernel"]
  assert enc["patch_embed"]["kernel"] and enc["cls_token"] and dec["mask_token"]
  assert not enc["blocks_0"]["attn"]["qkv"]["bias"] and not enc["norm"]["scale"]
  assert not enc["blocks_0"]["norm1"]["bias"] and not dec["decoder_embed"]["bias"]
  # Decay really is masked: a zero gradient leaves a bias alone but shrinks a kernel.
  tx = optim.make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5, b1=0.9, b2=0.95)
  p = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
  assert np.all(updates["bias"] == 0) and np.all(updates["kernel"] < 0)


def test_bad_batch_is_an_error_before_any_write(tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    train_and_evaluate(config_with(demo_dir, batch_size=12), workdir)
  assert not os.path.exists(workdir)


def test_resuming_another_model_or_run_is_refused(tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  train_and_evaluate(config_with(demo_dir, stop_at_step=2), workdir)
  files = sorted(os.listdir(workdir))
  with pytest.raises(ValueError, match=r"another model.*'width': \(64, 128\)"):
    train_and_evaluate(config_with(demo_dir, **{"model.width": 128}), workdir)
  with pytest.raises(ValueError, match=r"other settings.*'batch_size': \(16, 32\)"):
    train_and_evaluate(config_with(demo_dir, batch_size=32), workdir)
  with pytest.raises(ValueError, match=r"other settings.*'total_steps': \(200, 300\)"):
    train_and_evaluate(config_with(demo_dir, total_steps=300), workdir)
  assert sorted(os.listdir(workdir)) == files
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


def test_bucket_workdir_is_a_clear_error(tmp_path, demo_dir):
  with pytest.raises(ValueError, match="mount it"):
    train_and_evaluate(config_with(demo_dir), "gs://bucket/run")
  assert not os.path.exists("gs:")


def test_non_finite_state_stops_and_keeps_last_good_checkpoint(tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  # Warmup starts at lr 0, so step 1 keeps the (good) initial params; at step 2 a huge lr
  # overflows the params. Nothing non-finite may be saved.
  config = config_with(demo_dir, lr=1e30, warmup_steps=2, checkpoint_every_steps=1,
                       **NO_RECON)
  with pytest.raises(FloatingPointError, match=r"non-finite .* last good checkpoint \(step 1\)"):
    train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  params, model = load_params(workdir)  # the surviving checkpoint is whole and healthy
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  assert np.isfinite(float(mae_apply(params, images, jax.random.key(1), config=model).loss))


def test_stop_before_the_saved_step_is_refused(tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  train_and_evaluate(config_with(demo_dir, stop_at_step=4, **NO_RECON), workdir)
  with pytest.raises(ValueError, match="at step 4, past the requested stop at step 2"):
    train_and_evaluate(config_with(demo_dir, stop_at_step=2, **NO_RECON), workdir)


def two_host_reference(config, steps):
  """The same run in this one process: the global batch is host 0's batch then host 1's."""
  task = PretrainTask(config)
  model = task.model
  source = pipeline.make_source(config.input, config.input.split)
  plan = plan_run(config, len(source))
  schedule, tx = task.optimizer(plan.peak_lr, plan.warmup_steps, plan.total_steps)
  mesh = sharding.make_mesh(config.fsdp)
  state = create_state(task, tx, jax.random.key(config.seed), mesh)
  step = make_train_step(task, tx, schedule, mesh, abstract_state(task, tx), seed=config.seed)
  hosts = [iter(pipeline.make_train_loader(config.input, image_size=model.image_size,
                                           global_batch_size=config.batch_size,
                                           seed=config.seed, process_index=i, process_count=2))
           for i in range(2)]
  for _ in range(steps):
    images = np.concatenate([next(host)["image"] for host in hosts])
    state, _ = step(state, {"image": jax.device_put(images, sharding.batch_sharding(mesh))})
  return jax.device_get(state["params"])


def test_two_processes_on_localhost_agree(tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  env = {**os.environ, "NUM_PROCESSES": "2", "FAKE_DEVICES": "4", "TMPDIR": str(tmp_path)}
  flags = [f for f in main_command(workdir, demo_dir, stop_at_step=4)[3:]
           if not f.startswith("--workdir=")]
  proc = subprocess.run(["launch/local.sh", workdir, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  logs = re.search(r"processes 1-1 log to (\S+)", proc.stderr).group(1)
  # The console shows process 0 without Gloo's chatter; process 1 writes to its log.
  outputs = [proc.stdout + proc.stderr, open(os.path.join(logs, "process_1.log")).read()]
  assert "[Gloo]" not in outputs[0] and "[Gloo]" in outputs[1]
  assert "process 1/2" not in outputs[0]
  assert "process 0/2, 4 local / 8 global devices" in outputs[0]
  assert "process 1/2, 4 local / 8 global devices" in outputs[1]
  progress = [re.findall(r"step \d+/\d+ loss \S+ lr \S+ gnorm \S+", out) for out in outputs]
  assert len(progress[0]) == 2 and progress[0] == progress[1]
  assert os.listdir(os.path.join(workdir, "reconstructions")) == ["step_00000004.png"]
  params, _ = load_params(workdir)
  assert latest_step(workdir) == 4
  # Each host fed its own shard and the collectives summed them right: the checkpoint equals
  # one process training on the two hosts' batches side by side.
  want = two_host_reference(config_with(demo_dir), 4)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
