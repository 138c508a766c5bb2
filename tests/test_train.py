"""Pretraining end to end: demo run, resume after kill / SIGTERM, grad accumulation,
schedule and weight decay, errors before writes, and a two-process run on localhost."""
import copy
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
from jax.sharding import AxisType
from grain.experimental import index_shuffle

from configs import base, demo
from mae_jax import mae_apply, optim, sharding
from mae_jax.checkpointing import load_params
from mae_jax.data import pipeline, transforms
from mae_jax.tasks.pretrain import PretrainTask, model_config_from
from mae_jax.trainer import (abstract_state, create_state, make_train_step,
                             plan_and_optimizer, train_and_evaluate)
from mae_jax.trainer.setup import config_diff, is_free, model_diff

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


def set_fields(config, **fields):
  """A copy of the locked config with dotted fields ('model.width') set."""
  config = copy.deepcopy(config).unlock()
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config.lock()


def config_with(demo_dir, **extra):
  return set_fields(demo.get_config(), **{**OVERRIDES, "input.data_dir": demo_dir, **extra})


def main_command(workdir, demo_dir, **extra):
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "input.data_dir": demo_dir,
                                             **extra}.items()]
  return [sys.executable, "-m", "mae_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", *flags]


def params_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_demo_end_to_end(tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  # The length in epochs: 320 demo images at batch 16 are 20 steps per epoch.
  config = config_with(demo_dir, stop_at_step=4, total_steps=-1, warmup_steps=-1, epochs=10,
                       warmup_epochs=1)
  state = train_and_evaluate(config, workdir)
  assert int(state["step"]) == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["images_per_s"] > 0
  assert rows[1]["lr"] > 0 and rows[1]["param_norm"] > 0
  peak = config.base_lr * 16 / 256
  for r in rows:  # each row's lr is its last step's (step - 1 updates done before it)
    assert r["epoch"] == r["step"] / 20
    assert r["lr"] == pytest.approx(peak * (r["step"] - 1) / 20, rel=1e-3)
  assert {"eta_s", "grad_norm", "step_time_s", "epoch", "data_skipped"} <= set(rows[1])
  assert 0 < rows[1]["data_wait_s"] < rows[1]["step_time_s"]  # part of each step's time
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert sorted(os.listdir(os.path.join(workdir, "reconstructions"))) == [
      "output_step_0.npy", "step_00000004.png"]
  params, model = load_params(workdir)  # the final checkpoint serves evaluation
  assert model == model_config_from(config_with(demo_dir))
  assert params_equal(params, state["params"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, demo_dir):
  """Params after 20 steps of an uninterrupted run (logged every 2 steps), and its workdir."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return train_and_evaluate(config_with(demo_dir, stop_at_step=20), workdir)["params"], workdir


def test_logged_loss_is_the_mean_since_the_last_log(tmp_path, demo_dir, reference_run):
  """Each logged loss averages the steps since the previous log, not just the last step."""
  workdir = str(tmp_path / "every_step")
  train_and_evaluate(config_with(demo_dir, stop_at_step=4, log_every_steps=1,
                                 checkpoint_every_steps=4, **NO_RECON), workdir)
  def logged(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}
  each, every_2 = logged(workdir), logged(reference_run[1])
  assert sorted(each) == [1, 2, 3, 4]
  assert len({round(v, 6) for v in each.values()}) == 4  # distinct losses, so the mean shows
  for step in (2, 4):
    assert every_2[step] == pytest.approx((each[step - 1] + each[step]) / 2, rel=1e-6)


def wait_for_checkpoint(workdir, proc, step, timeout=240):
  done = os.path.join(workdir, "checkpoints", str(step))
  start = time.time()
  while not os.path.isdir(done):
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() - start < timeout, "no checkpoint appeared"
    time.sleep(0.02)


def latest_step(workdir):
  return max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def start_in_terminal(command, env=None):
  """`command` as a terminal's foreground job: its own process group (a Ctrl-C reaches every
  process in it), with SIGINT's default handling (a handler resets to it in a new program; a
  test run in the background of a script inherits SIGINT ignored, which children would keep)."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
  finally:
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=lambda sig: sig.name)
def test_resume_matches_uninterrupted_run(tmp_path, demo_dir, reference_run, sig):
  workdir = str(tmp_path / "run")
  # Ctrl-C on a terminal, with a grain worker process in the group.
  workers = {"input.worker_count": 1} if sig == signal.SIGINT else {}
  if sig == signal.SIGINT:
    proc = start_in_terminal(main_command(workdir, demo_dir, stop_at_step=20, **workers))
  else:
    proc = subprocess.Popen(main_command(workdir, demo_dir, stop_at_step=20), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wait_for_checkpoint(workdir, proc, 2)
  if sig == signal.SIGINT:
    os.killpg(proc.pid, sig)
  else:
    proc.send_signal(sig)
  output = proc.communicate(timeout=120)[0]
  interrupted_at = latest_step(workdir)
  if sig == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL
  elif sig == signal.SIGTERM:  # preemption: a checkpoint at the current step, then a clean exit
    assert proc.returncode == 0, output[-3000:]
    assert "preempted (SIGTERM): saved step" in output
  else:  # the same save, one line (no traceback from any process) and exit code 130
    assert proc.returncode == 130, output[-3000:]
    assert re.findall(r"\] (.*)\n", output)[-1] == (
        f"interrupted at step {interrupted_at}, saved; run the same command to continue")
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
  assert 2 <= interrupted_at < 20, "the run was not interrupted before its end"
  resumed = train_and_evaluate(config_with(demo_dir, stop_at_step=20, **workers), workdir)
  assert int(resumed["step"]) == 20
  # Bitwise: the same data order, masks and arithmetic as the run that never stopped.
  assert params_equal(resumed["params"], reference_run[0])


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


def without_key_bias(path, x):
  """Drops the key third of an attention's qkv bias: its gradient is zero in exact arithmetic
  (softmax ignores a shift of all logits), so Adam turns rounding noise there into steps of
  up to ~lr that differ between any two reduction orders. Its moments are still compared."""
  if jax.tree_util.keystr(path).endswith("['qkv']['bias']"):
    d = x.shape[-1] // 3
    return np.concatenate([x[:d], x[2 * d:]])
  return x


@pytest.mark.parametrize("fsdp,num_slices", [(4, 1), (2, 2)])
def test_fsdp_matches_data_parallel_on_params_and_optimizer_state(fsdp, num_slices):
  """Three steps with params and AdamW state sharded over 4 devices (or over 2 inside each
  of 2 slices: the 8 CPU devices split as a multi-slice job's) end where data parallel
  does: every parameter, both moments and the step counts."""
  config = config_with("unused", warmup_steps=0)
  task = PretrainTask(config)
  plan, schedule, tx = plan_and_optimizer(config, task, num_examples=320)
  states = []
  for mesh in (sharding.make_mesh(), sharding.make_mesh(fsdp, num_slices=num_slices)):
    state = create_state(task, tx, jax.random.key(0), mesh)
    if mesh.shape["fsdp"] > 1:
      assert mesh.shape == {"slice": num_slices, "data": 8 // fsdp // num_slices,
                            "fsdp": fsdp}
      kernel = state["params"]["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
      mu = state["opt_state"][0].mu["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
      for x in (kernel, mu):  # split inside a slice only
        assert "fsdp" in str(x.sharding.spec) and "slice" not in str(x.sharding.spec)
    step = make_train_step(task, tx, schedule, mesh, abstract_state(task, tx))
    for i in range(3):
      images = jax.device_put(jax.random.normal(jax.random.key(i), (16, 32, 32, 3)),
                              sharding.batch_sharding(mesh))
      state, _ = step(state, {"image": images})
    states.append(jax.device_get(state))
  dp, fs = states
  assert jax.tree.structure(dp) == jax.tree.structure(fs)
  counts = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(fs)
            if jax.tree_util.keystr(p).endswith(("count", "['step']"))]
  assert len(counts) == 3 and all(int(x) == 3 for _, x in counts), counts
  # Observed: moments within 5e-7 of each leaf's largest value; params within 4e-3 x lr (a
  # step moves a parameter by up to ~lr; float32 rounding of the params is 1e-4 x lr).
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dp["opt_state"]),
                          jax.tree.leaves(fs["opt_state"])):
    np.testing.assert_allclose(b, a, rtol=0, atol=5e-6 * np.abs(a).max(),
                               err_msg=jax.tree_util.keystr(path))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dp["params"]),
                          jax.tree.leaves(fs["params"])):
    np.testing.assert_allclose(without_key_bias(path, b), without_key_bias(path, a), rtol=0,
                               atol=2e-2 * plan.peak_lr, err_msg=jax.tree_util.keystr(path))


def test_one_slice_mesh_gives_the_two_axis_meshs_fsdp_step(monkeypatch):
  """On one slice the ('slice', 'data', 'fsdp') mesh is the ('data', 'fsdp') mesh of before
  with an axis of size 1: the same devices in the same order, equivalent shardings, and a
  train step whose outputs are bit for bit those of the two-axis mesh's step."""
  task = PretrainTask(config_with("unused", warmup_steps=0))
  _, schedule, tx = plan_and_optimizer(task.config, task, num_examples=320)
  abstract = abstract_state(task, tx)
  images = np.asarray(jax.random.normal(jax.random.key(0), (16, 32, 32, 3)))

  def run(mesh):
    """Shardings of the batch and state, and one step's outputs."""
    step = make_train_step(task, tx, schedule, mesh, abstract)
    batch = sharding.batch_sharding(mesh)
    state, metrics = step(create_state(task, tx, jax.random.key(0), mesh),
                          {"image": jax.device_put(images, batch)})
    return ([batch, *jax.tree.leaves(sharding.tree_sharding(mesh, abstract))],
            jax.device_get((state, metrics)))

  mesh = sharding.make_mesh(2)
  assert mesh.shape == {"slice": 1, "data": 4, "fsdp": 2}
  now, now_out = run(mesh)
  before = jax.make_mesh((4, 2), ("data", "fsdp"), (AxisType.Auto,) * 2)
  assert (mesh.devices[0] == before.devices).all()
  monkeypatch.setattr(sharding, "BATCH_AXES", ("data", "fsdp"))  # as it was
  then, then_out = run(before)
  assert any("fsdp" in str(s.spec) for s in now)
  for a, b, ndim in zip(now, then, [4] + [x.ndim for x in jax.tree.leaves(abstract)]):
    assert a.is_equivalent_to(b, ndim), (a, b)
  for a, b in zip(jax.tree.leaves(now_out), jax.tree.leaves(then_out)):
    np.testing.assert_array_equal(a, b)


IMAGENET_TRAIN_IMAGES = 1_281_167


def paper_lr(step: int) -> float:
  """Table 8 for ViT-B at batch 4096 on ImageNet-1k (312 steps per epoch): lr 1.5e-4 x 4096 /
  256, linear warmup over 40 epochs, then half-cosine to 0 at 800 epochs, set every step."""
  peak, warmup, total = 1.5e-4 * 4096 / 256, 40 * 312, 800 * 312
  if step < warmup:
    return peak * step / warmup
  return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))


def base_run(**fields):
  """The task, plan, schedule and optimizer the trainer builds from configs/base.py for
  ImageNet-1k; only the model is made tiny (the recipe's fields stay as the file sets them)."""
  config = base.get_config().unlock()
  config.model.update(**{k.split(".")[1]: v for k, v in OVERRIDES.items()
                         if k.startswith("model.")}, patch_size=8)
  config.update(fields)
  task = PretrainTask(config)
  return (task, *plan_and_optimizer(config, task, IMAGENET_TRAIN_IMAGES))


def test_lr_schedule_matches_recipe():
  config = base.get_config()
  assert config.batch_size == 4096 and config.base_lr == 1.5e-4
  assert (config.b1, config.b2, config.weight_decay) == (0.9, 0.95, 0.05)
  # Epochs -> steps by the trainer's own plan; accumulation splits the same global batch.
  for accum in (1, 4):
    _, plan, schedule, _ = base_run(grad_accum_steps=accum)
    assert (plan.steps_per_epoch, plan.warmup_steps, plan.total_steps, plan.stop_step) == (
        312, 40 * 312, 800 * 312, 800 * 312)
    peak = plan.peak_lr
    assert peak == pytest.approx(2.4e-3)
    steps_per_epoch, epochs, warmup_epochs = 312, 800, 40
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    for step in (0, 1, 1000, warmup - 1):  # per-step linear warmup from 0
      assert float(schedule(step)) == pytest.approx(peak * step / warmup, rel=1e-4, abs=1e-12)
    for step in (warmup, warmup + 12345, total - 7, total):  # half cosine to 0
      progress = (step - warmup) / (total - warmup)
      want = peak * 0.5 * (1 + np.cos(np.pi * progress))
      assert float(schedule(step)) == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_lr_schedule_needs_warmup_inside_the_run():
  assert float(optim.lr_schedule(1.0, 0, 10)(0)) == 1.0  # no warmup: the peak at once
  assert float(optim.lr_schedule(1.0, 9, 10)(9)) == 1.0
  for warmup in (-1, 10):
    with pytest.raises(ValueError, match=r"warmup_steps \(%d\) must be in \[0, total_steps "
                       r"\(10\)\)" % warmup):
      optim.lr_schedule(1.0, warmup, 10)


def test_optimizer_hyperparameters_are_keyword_only():
  """A positional number is never taken for another hyperparameter."""
  schedule = optim.lr_schedule(1.0, 1, 10)
  for make, args in [(optim.make_optimizer, (0.05, 0.9, 0.95)), (optim.lars, (0.9,)),
                     (optim.adamw_layer_decay, (0.05, 0.9, 0.999, {}, {}))]:
    with pytest.raises(TypeError, match="positional argument"):
      make(schedule, *args)  # all it needs, by position


def test_run_optimizer_is_the_papers_adamw():
  """The optimizer a configs/base.py run trains with, against AdamW written out in numpy:
  betas (0.9, 0.95), eps 1e-8, decoupled weight decay 0.05 on Linear weights and the cls /
  mask tokens only, at the paper's lr of each step."""
  task, _, _, tx = base_run()
  params = jax.device_get(task.init(jax.random.key(0))[0])
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  decays = [p.endswith(("['kernel']", "['cls_token']", "['mask_token']")) for p in paths]
  # Linear weights: patch and decoder embeddings, 4 per block (2 + 1 blocks), decoder_pred.
  assert sum(decays) == 15 + 2 and len(decays) == 48
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  update = jax.jit(tx.update)

  def check(updates, want, lr):
    # rtol: optax's warmup computes lr in float32 as peak x (1 - (1 - step / warmup)),
    # 3e-4 off at step 1. b2 0.999 instead of 0.95 moves the third update by 1e-2.
    for path, got, w in zip(paths, jax.tree.leaves(updates), want):
      np.testing.assert_allclose(got, w, rtol=1e-3, atol=1e-6 * lr, err_msg=path)

  # Weight decay alone: zero gradients at step s move a parameter by -lr(s) x 0.05 x p.
  zeros = jax.tree.map(np.zeros_like, params)
  for step in (1, 6240, 12480, 100_000, 240_000):
    state = optax.tree_utils.tree_set(tx.init(params), count=jnp.asarray(step, jnp.int32))
    updates, _ = update(zeros, state, params)
    lr = paper_lr(step)
    check(updates, [-lr * 0.05 * p * d for p, d in zip(leaves, decays)], lr)

  # Three steps from the start with random gradients: the moments and their bias correction.
  rng = np.random.default_rng(0)
  state = tx.init(params)
  m = [np.zeros_like(p) for p in leaves]
  v = [np.zeros_like(p) for p in leaves]
  for t in (1, 2, 3):
    grads = [rng.normal(size=p.shape) for p in leaves]
    updates, state = update(
        jax.tree.unflatten(jax.tree.structure(params), [g.astype(np.float32) for g in grads]),
        state, params)
    lr = paper_lr(t - 1)
    want = []
    for i, (p, g, d) in enumerate(zip(leaves, grads, decays)):
      m[i] = 0.9 * m[i] + 0.1 * g
      v[i] = 0.95 * v[i] + 0.05 * g * g
      adam = (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.95 ** t)) + 1e-8)
      want.append(-lr * (adam + 0.05 * p * d))
    check(updates, want, lr)


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


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a machine without a GPU")
def test_cudnn_attention_off_a_gpu_is_an_error_before_any_write(tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  config = config_with(demo_dir, **{"model.attention": "cudnn", "model.dtype": "bfloat16"})
  with pytest.raises(ValueError, match="'cudnn' needs a GPU, but JAX's device is 'cpu'"):
    train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_checkpoints_resume_with_another_attention_kernel(demo_dir):
  """The kernel, like the compute dtype, is not part of the model a checkpoint must match:
  the weights are the same. Checkpoints from before the option have no such field."""
  task = PretrainTask(config_with(demo_dir))
  saved = json.loads(json.dumps(task.model_dict()))
  assert saved["attention"] == "auto"
  before = {k: v for k, v in saved.items() if k != "attention"}
  assert model_diff(task, {**saved, "attention": "xla"}) == {} == model_diff(task, before)
  assert model_diff(task, {**saved, "width": 128}) == {"width": (128, 64)}


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
  with pytest.raises(ValueError, match=r"other settings.*'input.draft_decode'"):  # other pixels
    train_and_evaluate(config_with(demo_dir, **{"input.draft_decode": True}), workdir)
  with pytest.raises(ValueError, match=r"other settings.*'weight_decay': \(0.05, 0.1\)"):
    train_and_evaluate(config_with(demo_dir, weight_decay=0.1), workdir)
  assert sorted(os.listdir(workdir)) == files
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


def saved_config(config):
  return json.loads(config.to_json_best_effort())


def test_every_config_field_must_match_except_the_free_ones(demo_dir):
  """The resume check compares every field, so a field no list names (here a made-up new
  hyperparameter) is covered; the free fields (data location, workers, compute dtype and
  attention kernel, layout, logging, evaluation, stop) may change."""
  config = set_fields(config_with(demo_dir), new_hparam=1)
  saved = saved_config(config)
  assert config_diff(saved, config) == {}
  changed = {"new_hparam": 2, "weight_decay": 0.1, "seed": 3, "input.crop_scale": (0.5, 1.0),
             "input.draft_decode": True, "init_from": "/elsewhere"}
  diff = config_diff(saved, set_fields(config, **changed))
  assert sorted(diff) == sorted(changed)
  assert diff["input.crop_scale"] == ([0.2, 1.0], [0.5, 1.0])
  free = {"input.data_dir": "/mnt/copy", "input.worker_count": 4, "input.read_threads": 2,
          "input.normalize_on_device": False, "model.dtype": "bfloat16",
          "model.attention": "xla", "fsdp": 2, "num_slices": 2, "grad_accum_steps": 2,
          "stop_at_step": 7,
          "eval_only": True, "evals.reconstruction.every_steps": 3, "log_every_steps": 9,
          "checkpoint_every_steps": 9, "keep_checkpoints": 1, "compilation_cache_dir": "/c",
          "profile.steps": 2}
  assert config_diff(saved, set_fields(config, **free)) == {}
  assert all(is_free(k) for k in free)


def test_fields_a_checkpoint_predates_are_not_compared(demo_dir):
  """Checkpoints written before `input.draft_decode` or `input.normalize_on_device` existed
  resume with either setting."""
  config = config_with(demo_dir)
  before = saved_config(config)
  del before["input"]["draft_decode"], before["input"]["normalize_on_device"]
  drafted = set_fields(config, **{"input.draft_decode": True})
  assert config_diff(before, config) == {} == config_diff(before, drafted)
  assert config_diff(saved_config(config), drafted) == {"input.draft_decode": (False, True)}


def test_unsupported_url_workdir_is_a_clear_error(tmp_path, demo_dir):
  # gs:// workdirs: tests/test_buckets.py (against an emulator, without network).
  with pytest.raises(ValueError, match="only local paths and Cloud Storage paths"):
    train_and_evaluate(config_with(demo_dir), "s3://bucket/run")
  assert not os.path.exists("s3:")


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


def global_records(num_records, seed, count):
  """(record, rng key) of global positions 0 ... count - 1, the rule written out: position g
  holds record index_shuffle(g mod N) of epoch g // N (grain's permutation, seeded with
  seed + epoch), augmented with Philox keyed by seed * 2**64 + g. No host count appears."""
  out = []
  for g in range(count):
    epoch, i = divmod(g, num_records)
    out.append((index_shuffle(i, max_index=num_records - 1, seed=seed + epoch, rounds=4),
                seed * 2**64 + g))
  return out


def augmented(source, config, records):
  """[len(records), H, W, 3]: each record decoded and augmented with its rng (no skips:
  every demo image decodes)."""
  crop = transforms.RandomResizedCrop(config.model.image_size, tuple(config.input.crop_scale),
                                      tuple(config.input.crop_ratio))
  flip, decode = transforms.RandomHorizontalFlip(), transforms.DecodeImage()
  normalize = transforms.Normalize(tuple(config.input.mean), tuple(config.input.std))
  images = []
  for record, key in records:
    rng = np.random.Generator(np.random.Philox(key=key))
    element = flip.random_map(crop.random_map(decode.map(source[record]), rng), rng)
    images.append(normalize.map(element)["image"])
  return np.stack(images)


def reference_params(config, steps):
  """The run in this one process, fed global batch k = positions kB ... kB + B - 1 by the
  written-out rule (whatever the number of hosts that really read them)."""
  task = PretrainTask(config)
  source = pipeline.make_source(config.input, config.input.split)
  plan, schedule, tx = plan_and_optimizer(config, task, len(source))
  mesh = sharding.make_mesh(config.fsdp)
  state = create_state(task, tx, jax.random.key(config.seed), mesh)
  step = make_train_step(task, tx, schedule, mesh, abstract_state(task, tx), seed=config.seed)
  b = config.batch_size
  records = global_records(len(source), config.seed, steps * b)
  for i in range(steps):
    images = augmented(source, config, records[i * b:(i + 1) * b])
    state, _ = step(state, {"image": jax.device_put(images, sharding.batch_sharding(mesh))})
  return jax.device_get(state["params"]), plan


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
  assert sorted(os.listdir(os.path.join(workdir, "reconstructions"))) == [
      "output_step_0.npy", "step_00000004.png"]
  params, _ = load_params(workdir)
  assert latest_step(workdir) == 4
  # Each host fed its part of each global batch and the collectives summed them right: the
  # checkpoint equals one process training on the global batches of the written-out rule.
  want, plan = reference_params(config_with(demo_dir), 4)
  # Observed: 1-2 float32 ulps of the params (at most 1.6e-4 x lr); fed other records, the
  # params move apart by ~lr.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(without_key_bias(path, a), without_key_bias(path, b), rtol=0,
                               atol=2e-3 * plan.peak_lr, err_msg=jax.tree_util.keystr(path))


def test_ctrl_c_on_two_processes_saves_one_step(tmp_path, demo_dir):
  """launch/local.sh passes a Ctrl-C to every process: all save at the same step and stop."""
  workdir = str(tmp_path / "run")
  flags = [f for f in main_command(workdir, demo_dir, **NO_RECON)[3:]
           if not f.startswith("--workdir=")]
  env = {**os.environ, "NUM_PROCESSES": "2", "TMPDIR": str(tmp_path),
         "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
  proc = start_in_terminal(["launch/local.sh", workdir, *flags], env)
  wait_for_checkpoint(workdir, proc, 2)
  os.killpg(proc.pid, signal.SIGINT)
  try:
    output = proc.communicate(timeout=200)[0]
  except subprocess.TimeoutExpired:  # the processes did not stop: end them (the script
    proc.terminate()                 # passes SIGTERM on to each) before failing
    raise AssertionError(f"Ctrl-C did not stop the run: {proc.communicate()[0][-3000:]}")
  step = latest_step(workdir)
  assert proc.returncode == 130, output[-3000:]
  logs = re.search(r"processes 1-1 log to (\S+)", output).group(1)
  outputs = [output, open(os.path.join(logs, "process_1.log")).read()]
  for out in outputs:  # (besides JAX's and Orbax's notes on the preemption sync point)
    assert re.findall(r"\] (interrupted .*)\n", out) == [
        f"interrupted at step {step}, saved; run the same command to continue"], out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
  assert 2 <= step < 200
