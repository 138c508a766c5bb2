"""torch.save's zip format without torch: a restricted reader and a writer, side by side.

Reading (`safe_load_torch`) rebuilds tensors (as read-only numpy arrays), dicts and argparse
namespaces only: no code from the file runs, no object outside the load changes, memory stays
bounded by the file's size. Writing (`write_torch_zip`) pickles dicts of float32 arrays as torch
tensors, in the layout torch.load (weights_only too) and the reader both accept.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import re
import struct
import zipfile
from typing import IO, Any, NamedTuple, Sequence

import ml_dtypes
import numpy as np

# --- Safe reading of torch.save files (zip format) -------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType(NamedTuple):
  """Stands for a torch storage class in a pickle; it only carries the element dtype."""
  dtype: np.dtype


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Sequence[int],
                    stride: Sequence[int], *unused: Any) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 as numpy: a read-only, bounds-checked view of a storage.

  Each element must have its own place in the storage (no stride 0 on a dimension of size > 1,
  no overlap), so a tensor never holds more elements than its storage, nor more memory.
  """
  size, stride = tuple(size), tuple(stride)
  ints = (offset, *size, *stride)
  if (not isinstance(storage, np.ndarray) or len(size) != len(stride)
      or not all(isinstance(v, int) and v >= 0 for v in ints)):
    raise pickle.UnpicklingError(f"malformed tensor (offset {offset}, size {size}, "
                                 f"stride {stride})")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  reach = 0  # the largest offset the dimensions of smaller strides reach
  for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
    if s <= reach:
      raise pickle.UnpicklingError(
          f"tensor of size {size} with stride {stride} has elements sharing storage; expanded "
          f"or overlapping tensors are not supported")
    reach += (n - 1) * s
  if offset + reach >= storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size} reads past its storage")
  return np.lib.stride_tricks.as_strided(storage[offset:], size,
                                         [s * storage.itemsize for s in stride], writeable=False)


def _stored_entry(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
  """The entry `name`, which must be uncompressed, as torch.save writes every entry."""
  info = archive.getinfo(name)
  if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
    raise pickle.UnpicklingError(f"{name} is compressed; torch.save stores entries uncompressed, "
                                 f"and mae_jax reads no others")
  return info


class _RestrictedUnpickler(pickle._Unpickler):
  """Unpickles torch's data.pkl allowing only a few globals; storages come from the zip.

  The pure-Python unpickler, so that opcodes can be replaced. Each load gets its own globals (a
  namespace class and closures), and BUILD only sets attributes of the namespaces and
  OrderedDicts the load creates, so nothing in the file can change an object outside it.
  """

  def __init__(self, file: IO[bytes], archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix
    self._namespace = type("Namespace", (argparse.Namespace,), {})
    self._globals = {
        "collections.OrderedDict": lambda *args: collections.OrderedDict(*args),
        "argparse.Namespace": self._namespace,
        "torch._utils._rebuild_tensor_v2": lambda *args: _rebuild_tensor(*args),
        "torch._utils._rebuild_parameter": lambda data, *unused: data,
        "torch._utils._rebuild_parameter_with_state": lambda data, *unused: data,
    }
    self._big_endian = False
    if prefix + "byteorder" in archive.namelist():
      info = _stored_entry(archive, prefix + "byteorder")
      self._big_endian = archive.read(info).strip() == b"big"
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    if f"{module}.{name}" in self._globals:
      return self._globals[f"{module}.{name}"]
    raise pickle.UnpicklingError(
        f"refusing to load the global '{module}.{name}'. Only tensors, dicts and "
        f"argparse.Namespace are read from pickled checkpoints; this file may run code when "
        f"loaded with plain pickle or torch.load without weights_only")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[4] >= 0):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
    dtype, key, numel = pid[1].dtype, pid[2], pid[4]
    if key not in self._storages:
      try:
        info = _stored_entry(self._archive, f"{self._prefix}data/{key}")
      except KeyError:
        raise pickle.UnpicklingError(f"storage {key} is missing") from None
      if info.file_size != numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"storage {key} has {info.file_size} bytes, not the "
                                     f"{numel * dtype.itemsize} of {numel} {dtype} elements")
      storage = np.frombuffer(self._archive.read(info), dtype)
      self._storages[key] = storage.byteswap() if self._big_endian else storage
    return self._storages[key]

  def _load_build(self) -> None:
    """BUILD: sets attributes of a namespace or OrderedDict of this load from a dict."""
    state, inst = self.stack.pop(), self.stack[-1]
    if type(inst) not in (self._namespace, collections.OrderedDict):
      what = next((name for name, g in self._globals.items() if g is inst),
                  f"a {type(inst).__name__}")
      raise pickle.UnpicklingError(f"refusing to set the state of {what}: only namespaces and "
                                   f"OrderedDicts the file creates get attributes")
    if type(state) is not dict:
      raise pickle.UnpicklingError(f"refusing a {type(state).__name__} as the state of a "
                                   f"{type(inst).__name__}; only a dict of attributes is read")
    for key in state:
      if type(key) is not str or hasattr(type(inst), key):
        raise pickle.UnpicklingError(f"refusing the attribute {key!r:.40} of a "
                                     f"{type(inst).__name__}: not a name, or one of its class")
    inst.__dict__.update(state)

  def _load_extension(self) -> None:
    raise pickle.UnpicklingError("refusing a pickle extension code: those look globals up in "
                                 "copyreg's process-wide registry and cache")

  def _load_bytearray8(self) -> None:
    raise pickle.UnpicklingError("refusing a protocol 5 bytearray: its declared size would be "
                                 "allocated before it is read, and torch.save writes none")

  dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _load_build,
              pickle.BYTEARRAY8[0]: _load_bytearray8,
              **dict.fromkeys((pickle.EXT1[0], pickle.EXT2[0], pickle.EXT4[0]), _load_extension)}


def safe_load_torch(path: str) -> Any:
  """Reads a `torch.save` file (zip format) without torch and without running its code.

  Tensors come back as read-only numpy arrays with their storage dtype (bfloat16 via
  ml_dtypes), views of their storages. Any global besides tensors, OrderedDict and
  argparse.Namespace is refused; namespaces come back as a subclass of argparse.Namespace.
  Memory is bounded by the file's size: entries must be uncompressed and must not overlap, and
  each tensor lies within its storage.
  """
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f"{path} is not in torch's zip format (a legacy torch.save file or a plain pickle); "
        f"mae_jax does not unpickle those. Re-save it with torch >= 1.6: "
        f"torch.save(torch.load(path, weights_only=True), new_path)")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
      raise ValueError(f"{path}: not a torch checkpoint (no single <archive>/data.pkl)")
    if sum(i.compress_size for i in archive.infolist()) > os.path.getsize(path):
      raise ValueError(f"{path}: not a torch checkpoint (its zip entries overlap)")
    try:
      with archive.open(_stored_entry(archive, pickles[0])) as f:
        return _RestrictedUnpickler(f, archive, pickles[0][:-len("data.pkl")]).load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError,
            ValueError, struct.error) as e:
      raise pickle.UnpicklingError(f"{path}: {e}") from None


# --- torch.save's zip layout, written without torch --------------------------------------------

class _Global(NamedTuple):
  """A global of torch's, by name: the pickle refers to it without importing torch."""
  module: str
  name: str


class _Storage(NamedTuple):
  key: str
  numel: int


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_FLOAT_STORAGE = _Global("torch", "FloatStorage")


class _TorchPickler(pickle._Pickler):
  """Pickles float32 arrays as torch tensors (protocol 2, storages kept apart, as torch.save)."""

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages: list[np.ndarray] = []

  def persistent_id(self, obj: Any) -> Any:
    if type(obj) is _Storage:
      return ("storage", _FLOAT_STORAGE, obj.key, "cpu", obj.numel)
    return None

  def _save_array(self, obj: np.ndarray) -> None:
    """As torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""
    if obj.dtype != np.float32:
      raise TypeError(f"only float32 arrays are written, got {obj.dtype}")
    storage = _Storage(str(len(self.storages)), obj.size)
    self.storages.append(np.ascontiguousarray(obj, "<f4"))
    strides = tuple(int(np.prod(obj.shape[i + 1:])) for i in range(obj.ndim))  # in elements
    self.save(_REBUILD)
    self.save((storage, 0, obj.shape, strides, False, collections.OrderedDict()))
    self.write(pickle.REDUCE)

  def _save_global_name(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

  dispatch = {**pickle._Pickler.dispatch, _Global: _save_global_name, np.ndarray: _save_array}


def write_torch_zip(obj: Any, path: str) -> None:
  """Writes `obj` (dicts of float32 arrays) in torch.save's zip layout, without torch.

  torch.load (weights_only too) and mae_jax's restricted reader both read it back.
  """
  data = io.BytesIO()
  pickler = _TorchPickler(data)
  pickler.dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("archive/data.pkl", data.getvalue())
    archive.writestr("archive/byteorder", "little")
    for i, storage in enumerate(pickler.storages):
      archive.writestr(f"archive/data/{i}", storage.tobytes())
    archive.writestr("archive/version", "3\n")


def save_official(sd: dict[str, np.ndarray], path: str) -> None:
  """`{'model': state_dict}` as a .pth: torch.save when torch imports, else the same layout."""
  try:
    import torch  # optional: only to write with torch.save itself
  except ImportError:
    write_torch_zip({"model": sd}, path)
    return
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)

