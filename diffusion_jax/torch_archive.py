"""Read tensors from PyTorch zip archives (`torch.save` / TorchScript `.pt`) without torch.

Loading a checkpoint is a security boundary, so this is a restricted unpickler: it
rebuilds tensors as numpy arrays, lists, dicts and inert `ScriptObject` records for
TorchScript modules, and refuses every other global the pickle names. Code inside a
TorchScript archive is never read or run.
"""
from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

from diffusion_jax import paths

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class ScriptObject:
  """A TorchScript module's pickled state: `typename` and `state` (attribute dict)."""

  typename = ""

  def __setstate__(self, state):
    self.state = dict(state)

  def __repr__(self):
    return f"ScriptObject({self.typename})"


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.ascontiguousarray(view)


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix, self._storages = archive, prefix, {}
    self._script_types: dict[str, type] = {}

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch.jit._pickle" and name in (
        "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"):
      return list
    if module.startswith("__torch__."):
      typename = f"{module}.{name}"
      if typename not in self._script_types:
        self._script_types[typename] = type(name, (ScriptObject,), {"typename": typename})
      return self._script_types[typename]
    raise pickle.UnpicklingError(
        f"Refusing to load {module}.{name}: only tensors, containers and TorchScript module "
        "state may appear in a weights file. Re-export the weights as .safetensors or .npz.")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"Unsupported persistent record {pid!r}.")
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}/data/{key}")
      self._storages[key] = np.frombuffer(raw, storage_type.dtype, count=int(numel))
    return self._storages[key]


def load(path: str):
  """The object graph stored in a torch zip archive (local or gs://), with tensors as
  numpy arrays."""
  with paths.path(path).open("rb") as file:
    if not zipfile.is_zipfile(file):
      raise ValueError(f"{path} is not a torch zip archive (torch ≥ 1.6 format). Re-save it "
                       "with torch.save, or export the weights as .safetensors or .npz.")
    return _load_archive(file, path)


def _load_archive(file, path: str):
  with zipfile.ZipFile(file) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected exactly one */data.pkl in the archive, found {pickles}.")
    prefix = pickles[0][: -len("/data.pkl")]
    byteorder = f"{prefix}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
      raise ValueError(f"{path} was written big-endian; re-save it on a little-endian machine.")
    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, archive, prefix).load()


def flatten_tensors(obj, prefix: str = "") -> dict[str, np.ndarray]:
  """{"a.b.weight": array} for every array reachable through dicts and ScriptObjects."""
  out = {}
  items = (obj.state.items() if isinstance(obj, ScriptObject)
           else obj.items() if isinstance(obj, dict) else ())
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, np.ndarray):
      out[name] = value
    elif isinstance(value, (ScriptObject, dict)):
      out.update(flatten_tensors(value, name + "."))
  return out
