"""What a user sees: one-line errors for user mistakes (exit 1, nothing written), help, the
progress line, the end-of-run summary and the before/after reconstruction grid."""
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mae_jax import backends, convert, encode, init_params, mae_apply, model_config, visualize
from mae_jax.config import vit_config
from mae_jax.metrics import hms, progress_line
from mae_jax.trainer import train_and_evaluate
from test_train import ROOT, config_with

TINY = dict(image_size=32, width=64, depth=2, num_heads=4, decoder_width=32, decoder_depth=1,
            decoder_num_heads=4)


def run_main(*flags, cwd=ROOT, command=(sys.executable, "-m", "mae_jax.main")):
  return subprocess.run([*command, *flags], cwd=cwd, capture_output=True, text=True,
                        timeout=300)


def error_lines(stderr):
  """The lines a user reads, without the INFO line every run starts with."""
  return [line for line in stderr.splitlines() if "main.py" not in line or "] process" not in line]


def test_mistyped_config_flag_is_one_line_with_the_suggestion(tmp_path):
  workdir = tmp_path / "run"
  proc = run_main("--config=configs/demo.py", f"--workdir={workdir}", "--config.batchsize=8")
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [
      "error: the config has no field 'batchsize'; "
      'did you mean "batch_size" instead of "batchsize"?']
  assert not workdir.exists()


def test_missing_tfds_dataset_is_one_line_without_tfds_warnings(tmp_path):
  workdir = tmp_path / "run"
  proc = run_main("--config=configs/demo.py", f"--workdir={workdir}",
                  "--config.input.dataset=cifar10", f"--config.input.data_dir={tmp_path}/tfds")
  assert proc.returncode == 1
  [line] = error_lines(proc.stderr)
  assert line.startswith("error: tfds dataset 'cifar10' is not prepared") and "tfds build" in line
  assert not workdir.exists() and not (tmp_path / "tfds").exists()


def test_no_libtpu_chatter_on_a_machine_without_a_tpu(tmp_path, demo_dir):
  """With libtpu installed (the tpu extra) and JAX choosing the platform, a run on a machine
  without TPU chips shows only its own lines: JAX skips its TPU backend, libtpu stays unloaded."""
  pytest.importorskip("libtpu", reason="libtpu is not installed: nothing could complain")
  if backends.tpu_may_be_attached():
    pytest.skip("this machine may have TPU chips: libtpu is meant to initialise")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run(
      [sys.executable, "-m", "mae_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}/run", f"--config.input.data_dir={demo_dir}",
       "--config.batch_size=328"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1
  assert "process 0/1" in proc.stderr  # the error comes after JAX chose its devices
  assert error_lines(proc.stderr) == [
      "error: the dataset has 320 examples, fewer than one global batch of 328"]


def test_help_exits_0_and_shows_how_to_list_the_config_fields():
  proc = run_main("--help")
  assert proc.returncode == 0, proc.stderr
  assert "--print_config" in proc.stdout and "--config.<field>" in proc.stdout
  proc = run_main("--config=configs/demo.py", "--print_config", "--config.batch_size=32")
  assert proc.returncode == 0, proc.stderr
  assert "batch_size: 32" in proc.stdout and "mask_ratio: 0.75" in proc.stdout
  # epochs: 800 is printed too (every config has both ways to give the length): which wins
  assert "epochs: 800" in proc.stdout and proc.stdout.splitlines()[-1] == (
      "# length: total_steps=3000 (overrides epochs); "
      "warmup: warmup_steps=100 (overrides warmup_epochs)")


def test_local_launcher_resolves_a_relative_workdir_against_the_caller(tmp_path, demo_dir):
  (tmp_path / "run").write_text("")  # a file: the run must refuse it, by its absolute path
  proc = run_main("run", "--config=configs/demo.py", f"--config.input.data_dir={demo_dir}",
                  "--config.stop_at_step=1000000", cwd=tmp_path,
                  command=[os.path.join(ROOT, "launch", "local.sh")])
  assert proc.returncode == 1
  assert error_lines(proc.stderr) == [
      f"error: workdir '{tmp_path}/run' is a file; it must be a directory that every host "
      "sees (a shared filesystem, or a bucket: gs://bucket/path)"]


def test_only_our_own_checks_lose_their_traceback():
  from mae_jax import main

  def raised(fn):
    try:
      fn()
    except Exception as e:  # noqa: BLE001 (any error, to classify it)
      return e

  assert main.is_check(raised(lambda: model_config("X/9")))  # a check in mae_jax: one line
  assert not main.is_check(raised(lambda: json.loads("{")))  # a ValueError in a library
  assert not main.is_check(raised(lambda: {}["key"]))  # a bug


def test_mae_apply_needs_exactly_one_of_rng_and_noise():
  config = model_config("Ti/16", **TINY)
  params = init_params(config, jax.random.key(0))
  images = jnp.zeros((2, 32, 32, 3))
  with pytest.raises(ValueError, match="exactly one of rng or noise, got both"):
    mae_apply(params, images, jax.random.key(1), config=config, noise=jnp.zeros((2, 16)))
  with pytest.raises(ValueError, match="exactly one of rng or noise, got neither"):
    mae_apply(params, images, config=config)


def test_params_that_do_not_match_the_config_are_named():
  config = model_config("Ti/16", **TINY)
  params = init_params(config, jax.random.key(0))
  images = jnp.zeros((2, 32, 32, 3))
  with pytest.raises(ValueError, match=r"pass params\['encoder'\]"):
    encode(params, images, config=config)
  wider = model_config("Ti/16", **{**TINY, "width": 128})
  with pytest.raises(ValueError, match=r"mae_apply: the params do not match the config \(\d+ "
                     r"with other shapes, e.g. decoder/decoder_embed/kernel is \(64, 32\), the "
                     r"config expects \(128, 32\)\)"):
    mae_apply(params, images, jax.random.key(1), config=wider)
  deeper = vit_config("Ti/16", **{k: v for k, v in TINY.items() if "decoder" not in k
                                  and k != "depth"}, depth=3)
  with pytest.raises(ValueError, match=r"encode: .*\(missing: blocks_2/attn/proj/bias, "
                     r"blocks_2/attn/proj/kernel, blocks_2/attn/qkv/bias and 9 more\)"):
    encode(params["encoder"], images, config=deeper)
  assert encode(params["encoder"], images, config=config).shape == (2, 5, 64)


def test_channel_count_in_words():
  config = model_config("Ti/16", **TINY)
  params = init_params(config, jax.random.key(0))
  with pytest.raises(ValueError, match="images have 1 channel, the config expects 3 channels"):
    encode(params["encoder"], jnp.zeros((2, 32, 32, 1)), config=config)
  with pytest.raises(ValueError, match="images have 4 channels, the config expects 3 channels"):
    encode(params["encoder"], jnp.zeros((2, 32, 32, 4)), config=config)
  gray = model_config("Ti/16", **TINY, channels=1)
  with pytest.raises(ValueError, match="images have 3 channels, the config expects 1 channel "):
    encode(init_params(gray, jax.random.key(0))["encoder"], jnp.zeros((2, 32, 32, 3)),
           config=gray)


def test_eta_is_hours_minutes_seconds():
  assert hms(0) == "0:00:00" and hms(185.4) == "0:03:05" and hms(90061) == "25:01:01"
  line = progress_line(20, 600, dict(loss=0.5, lr=1e-3, grad_norm=0.2, images_per_s=300,
                                     step_time_s=0.2, eta_s=116))
  assert line.endswith("200 ms/step eta 0:01:56")
  line = progress_line(20, 600, dict(loss=0.5, lr=1e-3, grad_norm=0.2, images_per_s=300,
                                     step_time_s=0.2, data_wait_s=0.05, eta_s=116))
  assert line.endswith("200 ms/step (data wait 50 ms) eta 0:01:56")


def test_grid_titles_and_upscaling():
  rng = np.random.default_rng(0)
  columns = [rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8) for _ in range(3)]
  grid = visualize.grid_image(columns, ["a", "b", "c"], scale=3, pad=2)
  assert grid.shape == (16 + 2 * (24 + 2) + 2, 3 * (24 + 2) + 2, 3)
  assert (grid[:16] < 128).any()  # the titles
  y, x = 16 + 2 + 26, 2 + 26  # second row, second column: each pixel became 3 x 3
  np.testing.assert_array_equal(grid[y:y + 24, x:x + 24],
                                columns[1][1].repeat(3, axis=0).repeat(3, axis=1))
  with pytest.raises(ValueError, match="3 columns but 2 titles"):
    visualize.grid_image(columns, ["a", "b"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_dir):
  """A 4-step run and what it logged."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  handler, logger = ListHandler(), logging.getLogger("mae_jax")
  level = logger.level
  logger.setLevel(logging.INFO)
  logger.addHandler(handler)
  try:
    train_and_evaluate(config_with(demo_dir, stop_at_step=4), workdir)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  return workdir, handler.messages


class ListHandler(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def test_end_of_run_summary_says_what_happened_and_where_it_went(finished_run):
  workdir, messages = finished_run
  summary = [m for m in messages if m.startswith("trained steps")]
  assert len(summary) == 1
  assert summary[0].startswith("trained steps 0 -> 4 in 0:0")
  assert " (step 2) -> " in summary[0] and summary[0].endswith(" (step 4)")
  png = os.path.join(workdir, "reconstructions", "step_00000004.png")
  assert messages[-5:] == [summary[0], f"checkpoint: {workdir}/checkpoints/4",
                           f"metrics: {workdir}/metrics.jsonl",
                           f"tensorboard --logdir {workdir}/tensorboard",
                           f"reconstructions: {workdir}/reconstructions"]
  assert f"reconstructions: {png}" in messages


def grid_column(workdir, step, j):
  """Column j of the reconstruction grid at `step` (tiny demo MAE), without its title."""
  grid = np.asarray(Image.open(os.path.join(workdir, "reconstructions", f"step_{step:08d}.png")))
  side = 32 * visualize.display_scale(32)  # upscaled for display
  assert grid.shape == (16 + 2 * (side + 2) + 2, 5 * (side + 2) + 2, 3)
  return grid[16:, 2 + j * (side + 2):2 + j * (side + 2) + side]


def test_reconstruction_grid_shows_the_untrained_model_next_to_the_trained_one(finished_run):
  workdir, _ = finished_run
  assert not np.array_equal(grid_column(workdir, 4, 2), grid_column(workdir, 4, 3))  # 0 vs 4


def test_resumed_runs_show_the_step_0_outputs(finished_run, demo_dir, tmp_path):
  """The step-0 column stays step 0's after a resume; from a workdir without the saved step-0
  outputs, it shows the step the run resumed from."""
  for kept in (True, False):
    workdir = str(tmp_path / f"kept_{kept}")
    shutil.copytree(finished_run[0], workdir)
    if not kept:
      os.remove(os.path.join(workdir, "reconstructions", "output_step_0.npy"))
    train_and_evaluate(config_with(demo_dir, stop_at_step=6), workdir)
    want = grid_column(workdir, 4, 2 if kept else 3)  # step 0's outputs, or step 4's
    assert np.array_equal(grid_column(workdir, 6, 2), want)


def test_a_finished_run_says_only_that_there_is_nothing_to_train(finished_run, demo_dir,
                                                                  caplog):
  workdir, _ = finished_run
  with caplog.at_level(logging.INFO, logger="mae_jax"):
    train_and_evaluate(config_with(demo_dir, stop_at_step=4), workdir)
  assert [r.getMessage() for r in caplog.records] == [
      f"resumed from step 4 in {workdir}", f"{workdir} is already at step 4: nothing to train"]


def test_convert_errors_are_one_line_and_a_workdir_names_its_step(finished_run, tmp_path,
                                                                  capsys):
  workdir, _ = finished_run
  (tmp_path / "taken").mkdir()
  with pytest.raises(SystemExit) as exit_:
    convert.main([workdir, str(tmp_path / "taken")])
  assert exit_.value.code == 2  # argparse's code for a refused command line (test_convert)
  out = capsys.readouterr()
  assert out.out == "" and out.err == f"error: {tmp_path}/taken exists; refusing to overwrite it\n"
  assert convert.main([workdir, str(tmp_path / "params")]) == 0
  assert capsys.readouterr().out.startswith(f"reading step 4 of {workdir}\nwrote ")


def test_both_command_lines_import_into_one_process():
  import importlib
  for name in ("mae_jax.aot", "mae_jax.main"):  # each defines --config only when run
    importlib.import_module(name)
