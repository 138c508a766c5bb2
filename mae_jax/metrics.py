"""Metric outputs of a run (TensorBoard events, JSON lines, console) and FLOP estimates."""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

from etils import epath
import numpy as np


def _import_tensorboardx() -> Any:
  """tensorboardX, imported without torch: its writer imports torch when it can, only to
  accept torch tensors (never passed here), which adds ~7 s to every start where torch is
  installed. A None entry makes that import fail as if torch were absent, for this import
  only."""
  mask = "torch" not in sys.modules
  if mask:
    sys.modules["torch"] = None
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    if mask:
      del sys.modules["torch"]
  return tensorboardX


tensorboardX = _import_tensorboardx()
SummaryWriter, record_writer = tensorboardX.SummaryWriter, tensorboardX.record_writer

from mae_jax import storage
from mae_jax.config import ModelConfig

# Dense bfloat16 peak FLOP/s of one device, by jax's device_kind (vendor figures). Exact
# names first: TPU v5p reports "TPU v5", v5e "TPU v5 lite"; PCIe / NVL GPUs run lower clocks.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v4 lite": 138e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}
GPU_PEAK_FLOPS = (  # (device_kind prefix, FLOP/s), most specific first
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100", 989e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak FLOP/s of one device of this kind, or None when unknown (e.g. CPU)."""
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  for prefix, flops in GPU_PEAK_FLOPS:
    if device_kind.startswith(prefix):
      return flops
  return None


def _blocks_flops(tokens: int, width: int, mlp_dim: int, depth: int) -> float:
  """Forward FLOPs of `depth` transformer blocks on `tokens` tokens (multiply-add = 2)."""
  matmuls = tokens * (3 * width * width + width * width + 2 * width * mlp_dim)
  attention = 2 * tokens * tokens * width  # q @ k^T and attn @ v
  return 2.0 * depth * (matmuls + attention)


def train_flops_per_image(cfg: ModelConfig) -> float:
  """Model FLOPs of one training example (forward + backward = 3 x forward)."""
  n = cfg.num_patches
  enc_tokens = 1 + (n if cfg.encoder_mask_tokens else cfg.num_visible)
  fwd = 2.0 * enc_tokens * cfg.patch_dim * cfg.width  # patch embedding
  fwd += _blocks_flops(enc_tokens, cfg.width, cfg.mlp_dim, cfg.depth)
  fwd += 2.0 * enc_tokens * cfg.width * cfg.decoder_width  # decoder embedding
  fwd += _blocks_flops(1 + n, cfg.decoder_width, cfg.decoder_mlp_dim, cfg.decoder_depth)
  fwd += 2.0 * (1 + n) * cfg.decoder_width * cfg.patch_dim  # pixel prediction
  return 3.0 * fwd


class _BucketEventFile:
  """A TensorBoard events file in a bucket, through epath: a bucket object cannot be
  appended to, so each flush rewrites the events so far (as tf.io.gfile does on GCS)."""

  def __init__(self, path: str):
    self._file, self._data = epath.Path(path), bytearray()

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    self._file.write_bytes(bytes(self._data))

  def close(self) -> None:
    self.flush()


class _BucketEventFiles:
  """tensorboardX's writer factory for gs:// (its own needs google-cloud-storage's client)."""

  def open(self, path: str) -> _BucketEventFile:
    return _BucketEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # a bucket has no folders to create


record_writer.register_writer_factory("gs", _BucketEventFiles())


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl`, images to TensorBoard.

  Only process 0 writes; on other processes every call is a no-op.
  """

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    if enabled:
      self._tb = SummaryWriter(str(storage.path(workdir) / "tensorboard"))
      self._jsonl = storage.GrowingFile(storage.path(workdir) / "metrics.jsonl")

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, image, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def hms(seconds: float) -> str:
  """Seconds as h:mm:ss (rounded to the second)."""
  minutes, s = divmod(round(seconds), 60)
  return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
  mfu = f" mfu {m['mfu']:.1%}" if "mfu" in m else ""
  wait = f" (data wait {m['data_wait_s'] * 1e3:.0f} ms)" if "data_wait_s" in m else ""
  return (f"step {step}/{total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
          f"gnorm {m['grad_norm']:.3f} {m['images_per_s']:.1f} img/s "
          f"{m['step_time_s'] * 1e3:.0f} ms/step{wait}{mfu} eta {hms(m.get('eta_s', 0.0))}")


def log_progress(step: int, total: int, m: dict[str, float]) -> None:
  logging.getLogger(__name__).info(progress_line(step, total, m))
