"""Where runs write and data is read: a local disk or a Cloud Storage bucket (gs://).

Every file of a run goes through `etils.epath.Path`, the path abstraction Orbax and tfds use
too: local paths go to the operating system, gs:// paths to gcsfs (the `gcs` extra), and
Orbax writes arrays through TensorStore's own GCS driver. Objects in a bucket cannot be
appended to or renamed cheaply, so files that grow (metrics, TensorBoard events) are
rewritten whole by `GrowingFile`.
"""
from __future__ import annotations

import os
import posixpath
import time
from typing import Iterator

from etils import epath

GCS_EXTRA = "pip install mae_jax[gcs]"


def is_bucket(path: str | os.PathLike[str]) -> bool:
  return os.fspath(path).startswith("gs://")


def path(location: str | os.PathLike[str]) -> epath.Path:
  """`location` as an epath.Path: gs:// URIs as given, local paths absolute (~ expanded)."""
  location = os.fspath(location)
  if "://" in location:
    return epath.Path(location)
  return epath.Path(os.path.abspath(os.path.expanduser(location)))


def check(location: str | os.PathLike[str] | None, what: str) -> None:
  """Refuses a location this installation cannot use, before anything runs or is written.

  Local paths pass. A gs:// path needs gcsfs (the `gcs` extra) and Google Cloud credentials
  (Application Default Credentials: on a TPU or GCE VM its service account), except on an
  emulator (`STORAGE_EMULATOR_HOST` set), which takes none. Other URL schemes are refused.
  """
  if location is None:
    return
  location = os.fspath(location)
  if "://" not in location:
    return
  if not is_bucket(location):
    raise ValueError(f"{what} {location!r}: only local paths and Cloud Storage paths "
                     "(gs://bucket/path) are supported")
  try:
    import gcsfs  # noqa: F401  (what epath reads and writes gs:// with)
  except ImportError:
    raise ValueError(f"{what} {location!r} is in Cloud Storage, which needs the gcs extra: "
                     f"{GCS_EXTRA}") from None
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return
  import google.auth  # a dependency of gcsfs
  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError:
    raise ValueError(
        f"{what} {location!r}: no Google Cloud credentials found (a TPU or GCE VM uses its "
        "service account; elsewhere run `gcloud auth application-default login` or set "
        "GOOGLE_APPLICATION_CREDENTIALS)") from None


def walk_files(root: epath.Path) -> Iterator[epath.Path]:
  """Every file under `root`, in no particular order (local symlinked folders followed)."""
  if is_bucket(root):
    top = os.fspath(root).removeprefix("gs://")
    for folder, _, files in root.walk():  # folders as bucket/path, without the scheme
      folder = root / posixpath.relpath(os.fspath(folder).removeprefix("gs://"), top)
      yield from (folder / f for f in files)
  else:
    for folder, _, files in os.walk(root, followlinks=True):
      yield from (epath.Path(folder) / f for f in files)


class GrowingFile:
  """A text file that only grows (JSON lines), continued if it exists.

  Local files are appended to and flushed at every write. A bucket object cannot be
  appended to: the whole text is rewritten, at most every `min_interval_s` seconds (Cloud
  Storage allows about one write per second to an object) and on `close`.
  """

  def __init__(self, file: epath.Path, min_interval_s: float = 10.0):
    self._file, self._interval = file, min_interval_s
    self._bucket = is_bucket(file)
    if self._bucket:
      self._text = file.read_text() if file.exists() else ""
      self._written = time.monotonic()
    else:
      self._local = file.open("a")

  def write(self, text: str) -> None:
    if not self._bucket:
      self._local.write(text)
      self._local.flush()
      return
    self._text += text
    if time.monotonic() - self._written >= self._interval:
      self.flush()

  def flush(self) -> None:
    if self._bucket:
      self._file.write_text(self._text)
      self._written = time.monotonic()
    else:
      self._local.flush()

  def close(self) -> None:
    self.flush()
    if not self._bucket:
      self._local.close()
