"""launch/tpu_pod.sh, driven through a stand-in gcloud (tests/fake_gcloud/gcloud): a TPU slice of
two workers on this machine, each a folder (its home) and a process, the job over gloo on
localhost. What it cannot show: the real gcloud's SSH, the TPU VMs' metadata server, libtpu."""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from test_train import NO_RECON, OVERRIDES, ROOT, latest_step

FAKE_BIN = os.path.join(ROOT, "tests", "fake_gcloud")
LAUNCHER = os.path.join(ROOT, "launch", "tpu_pod.sh")
ZONE = "us-central2-b"


@pytest.fixture
def cloud(tmp_path):
  """Makes the stand-in's environment; afterwards ends the jobs its workers still run (a test
  that failed half-way leaves them running: they are detached)."""
  root = tmp_path / "cloud"
  root.mkdir()

  def make_env(**extra):
    return {**os.environ, "PATH": f"{FAKE_BIN}:{os.environ['PATH']}",
            "FAKE_TPU_ROOT": str(root), "REAL_PYTHON": sys.executable,
            "XDG_STATE_HOME": str(tmp_path / "state"),
            "XLA_FLAGS": "", **extra}  # one CPU device per worker (conftest gives this one 8)

  yield make_env
  for pid_file in glob.glob(str(root / "*" / "worker-*" / "mae_jax_job" / "pid")):
    try:
      os.killpg(os.getpgid(int(open(pid_file).read())), signal.SIGKILL)
    except ProcessLookupError:
      pass


def make_tpu(env, name, workers=2):
  for w in range(workers):
    os.makedirs(os.path.join(env["FAKE_TPU_ROOT"], name, f"worker-{w}"))


def pod(env, *args, timeout=120):
  # Captured output: a job that kept the SSH session's stdout open would hang this call.
  return subprocess.run([LAUNCHER, *args], env=env, capture_output=True, text=True,
                        timeout=timeout)


def home(env, name, worker):
  return os.path.join(env["FAKE_TPU_ROOT"], name, f"worker-{worker}")


def worker_log(env, worker):
  with open(os.path.join(home(env, "pod", worker), "mae_jax_job", "log")) as f:
    return f.read()


def statuses(env):
  out = pod(env, "status", "pod", ZONE)
  assert out.returncode == 0, out.stderr
  lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
  assert sorted(lines) == ["worker 0", "worker 1"], out.stdout
  return lines


def wait_until(condition, timeout=180):
  start = time.time()
  while not (value := condition()):
    assert time.time() - start < timeout, "timed out"
    time.sleep(0.1)
  return value


def step_of(line):
  return int(re.search(r"step (\d+)", line).group(1))


@pytest.mark.parametrize("args, error", [
    (["compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all", "--command=true"], "--zone"),
    (["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z", "--command=true"], "--worker"),
    (["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z", "--worker=all"], "--command"),
    (["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z", "--worker=all", "--command=true",
      "--bogus=1"], "unrecognized arguments: --bogus=1"),
    (["compute", "tpus", "tpu-vm", "ssh", "other", "--zone=z", "--worker=all",
      "--command=true"], "NOT_FOUND"),
])
def test_stand_in_refuses_calls_the_real_gcloud_refuses(cloud, args, error):
  env = cloud()
  make_tpu(env, "pod")
  out = subprocess.run([os.path.join(FAKE_BIN, "gcloud"), *args], env=env, capture_output=True,
                       text=True, timeout=30)
  assert out.returncode == 1 and error in out.stderr


def test_setup_run_status_logs_stop_and_resume(cloud, tmp_path, demo_dir):
  env = cloud()
  make_tpu(env, "pod")
  workdir = str(tmp_path / "run")
  flags = ["--config=configs/demo.py", f"--config.input.data_dir={demo_dir}",
           *(f"--config.{k}={v}" for k, v in {**OVERRIDES, **NO_RECON}.items())]

  out = pod(env, "setup", "pod", ZONE)
  assert out.returncode == 0, out.stderr
  for w in (0, 1):  # this checkout, installed at the pinned versions (the stand-in's pip)
    assert os.path.isfile(os.path.join(home(env, "pod", w), "mae_jax", "launch", "tpu_worker.sh"))
    with open(os.path.join(home(env, "pod", w), "pip_calls")) as f:
      assert f.read() == "--quiet -c constraints.txt -e .[tpu,gcs]\n"

  out = pod(env, "run", "pod", ZONE, "relative/dir", *flags)
  assert out.returncode == 1 and "give a gs:// path or an absolute path" in out.stderr

  out = pod(env, "run", "pod", ZONE, workdir, *flags, timeout=30)
  assert out.returncode == 0, out.stderr
  assert "worker 0: started" in out.stdout and "worker 1: started" in out.stdout
  # The launcher has exited; the job goes on, and status shows both workers' steps.
  wait_until(lambda: all("running" in s and "/200" in s for s in statuses(env).values()))
  assert "a job is running" in pod(env, "run", "pod", ZONE, workdir, *flags).stderr

  out = pod(env, "logs", "pod", ZONE, "1", "50")
  assert out.returncode == 0 and out.stdout.startswith("== worker 1\n")
  assert re.search(r"step \d+/200 loss", out.stdout)
  assert "process 1/2, 1 local / 2 global devices" in worker_log(env, 1)

  out = pod(env, "stop", "pod", ZONE)
  assert out.returncode == 0, out.stderr
  stopped = statuses(env)
  assert all(s.startswith("stopped") for s in stopped.values()), stopped
  saved = step_of(stopped["worker 0"])
  assert step_of(stopped["worker 1"]) == saved and 0 < saved < 200
  assert latest_step(workdir) == saved  # a checkpoint at the step where both stopped
  for w in (0, 1):
    assert f"preempted (SIGTERM): saved step {saved}, exiting" in worker_log(env, w)

  # Again: it resumes. A stop while it restores and compiles saves at its first step.
  out = pod(env, "run", "pod", ZONE, workdir, *flags, timeout=30)
  assert out.returncode == 0, out.stderr
  wait_until(lambda: all(f"resumed from step {saved} in {workdir}" in worker_log(env, w)
                         for w in (0, 1)))
  out = pod(env, "stop", "pod", ZONE)
  assert out.returncode == 0, out.stderr
  resumed = statuses(env)
  assert all(s.startswith("stopped") for s in resumed.values()), resumed
  again = step_of(resumed["worker 0"])
  assert step_of(resumed["worker 1"]) == again and saved < again < 200
  assert latest_step(workdir) == again


def calls(env):
  with open(os.path.join(env["FAKE_TPU_ROOT"], "calls.log")) as f:
    return f.read()


def job_log(env, node, worker):
  path = os.path.join(home(env, node, worker), "mae_jax_job", "log")
  return open(path).read() if os.path.exists(path) else ""


def test_multi_slice_request_setup_environment_and_logs(cloud):
  """SLICES=2: one queued resource of two nodes, and each slice's workers told the layout (the
  stand-in main prints its MEGASCALE_* environment instead of training)."""
  env = cloud(SLICES="2", FAKE_TPU_WORKERS="1", FAKE_MAIN="1")
  out = pod(env, "create", "big", ZONE, "v5p-128", "v2-alpha-tpuv5", "--spot")
  assert out.returncode == 0, out.stderr
  assert ("queued-resources create big --zone=us-central2-b --accelerator-type=v5p-128 "
          "--runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=big --spot") in calls(env)
  assert pod(env, "setup", "big", ZONE).returncode == 0
  out = pod(env, "run", "big", ZONE, "gs://bucket/run", "--config=configs/base.py")
  assert out.returncode == 0, out.stderr
  assert "slice 0 worker 0: started" in out.stdout and "slice 1 worker 0: started" in out.stdout
  for s in (0, 1):
    log = wait_until(lambda: "main " in job_log(env, f"big-{s}", 0) and job_log(env, f"big-{s}", 0))
    assert (f"MEGASCALE_COORDINATOR_ADDRESS=127.0.0.1:8080\nMEGASCALE_NUM_SLICES=2\n"
            f"MEGASCALE_PORT=8080\nMEGASCALE_SLICE_ID={s}\n") in log
    assert "main --jax_distributed --workdir=gs://bucket/run" in log
  out = pod(env, "logs", "big", ZONE, "1:0")
  assert out.returncode == 0 and out.stdout.startswith("== slice 1 worker 0\n")
  out = pod(env, "status", "big", ZONE)
  assert sorted(line.split(":")[0] for line in out.stdout.splitlines()) == [
      "slice 0 worker 0", "slice 1 worker 0"]
  assert out.stdout.count(": running") == 2
  out = pod(env, "stop", "big", ZONE)
  assert out.returncode == 0 and out.stdout.count(": stopped") == 2, out.stdout + out.stderr


def test_watch_renews_a_reclaimed_slice_and_restarts_the_job(cloud):
  env = cloud(FAKE_MAIN="1", WATCH_INTERVAL="0.2")
  assert pod(env, "create", "spot", ZONE, "v5litepod-16", "v2-alpha-tpuv5-lite",
             "--spot").returncode == 0
  watch = subprocess.Popen([LAUNCHER, "watch", "spot", ZONE, "gs://bucket/run"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    # Fresh workers: set up, then started.
    wait_until(lambda: all("main " in job_log(env, "spot", w) for w in (0, 1)), timeout=60)
    # Reclaimed: the watch requests the slice again, sets up its new workers, restarts the job.
    with open(os.path.join(env["FAKE_TPU_ROOT"], "queued", "spot"), "w") as f:
      f.write("SUSPENDED\n")
    wait_until(lambda: calls(env).count("queued-resources create spot") == 2, timeout=60)
    assert "queued-resources delete spot --zone=us-central2-b --force --quiet" in calls(env)
    wait_until(lambda: all("main " in job_log(env, "spot", w) for w in (0, 1)), timeout=60)
    assert all(job_log(env, "spot", w).count("=== ") == 1 for w in (0, 1))  # new VMs
    # Stopped by hand: the watch ends.
    assert pod(env, "stop", "spot", ZONE).returncode == 0
    output = watch.communicate(timeout=60)[0]
  finally:
    if watch.poll() is None:
      watch.kill()
  assert watch.returncode == 0 and "stopped by hand" in output, output
