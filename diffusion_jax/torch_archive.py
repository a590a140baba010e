"""Read tensors from PyTorch zip archives (`torch.save` / TorchScript `.pt`) without torch.

Loading a checkpoint is a security boundary, so this is a restricted unpickler: it
rebuilds tensors as numpy arrays, lists, dicts and inert `ScriptObject` records for
TorchScript modules, and refuses every other global the pickle names. Code inside a
TorchScript archive is never read or run.
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import zipfile
import zlib

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


_MAX_ELEMENTS = 2**31  # per tensor; far above any weights file's, far below a crash
# data.pkl of a weights file lists its tensors in tens of kilobytes; a bigger one is crafted.
MAX_PICKLE_BYTES = 8 << 20
MAX_MEMBERS = 10_000  # files in the zip; a weights file has one per storage, a few hundred
MAX_ENTRIES = 1_000_000  # containers, keys and tensors of the graph, shared ones counted per use
MAX_DEPTH = 100


class _BadTensor:
  """A tensor record that does not fit its storage; reported by name after loading."""

  def __init__(self, reason: str):
    self.reason = reason


def _layout_problem(storage, offset, size, stride) -> str | None:
  """Why (offset, size, stride) does not lie inside `storage`, or None when it does."""
  if not isinstance(storage, np.ndarray):
    return "it has no storage record"
  ints = lambda xs: isinstance(xs, (tuple, list)) and all(
      isinstance(x, int) and not isinstance(x, bool) for x in xs)
  if not (ints([offset]) and ints(size) and ints(stride)) or len(size) != len(stride):
    return f"malformed layout (offset {offset!r}, size {size!r}, stride {stride!r})"
  if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
    return f"negative offset, size or stride ({offset}, {tuple(size)}, {tuple(stride)})"
  numel = int(np.prod(size, dtype=object)) if size else 1
  if numel > _MAX_ELEMENTS:
    return f"{numel} elements, more than the {_MAX_ELEMENTS} a tensor may have here"
  if numel == 0:
    return None if offset <= len(storage) else f"offset {offset} past its storage"
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if last >= len(storage):
    return (f"offset {offset}, size {tuple(size)} and stride {tuple(stride)} reach element "
            f"{last} of a storage of {len(storage)} elements")
  return None


def _children(obj):
  """(key, value) pairs of a container in the loaded graph; () for anything else."""
  if isinstance(obj, ScriptObject):
    return getattr(obj, "state", {}).items()
  if isinstance(obj, dict):
    return obj.items()
  if isinstance(obj, (list, tuple)):
    return enumerate(obj)
  return ()


def _check_graph(obj) -> None:
  """Raises ValueError when the graph, walked as a tree (a shared object
  once per use), has a cycle, nests deeper than MAX_DEPTH or exceeds MAX_ENTRIES.

  A pickle can share one object many times, so a file of a kilobyte can describe a
  tree of 2^79 entries; each container's expanded size is memoised here, so this check
  is linear in the distinct objects, and every later walk is bounded by MAX_ENTRIES.
  """
  sizes: dict[int, int | None] = {}

  def size(node, depth: int) -> int:
    children = _children(node)
    if not children:
      return 1
    key = id(node)
    if key in sizes:
      if sizes[key] is None:
        raise ValueError("its object graph contains a cycle; the file is crafted.")
      return sizes[key]
    if depth > MAX_DEPTH:
      raise ValueError(f"it nests containers deeper than {MAX_DEPTH} levels; the file is "
                       "crafted.")
    sizes[key] = None
    total = 1
    for k, value in children:
      total += size(k, depth + 1) + size(value, depth + 1)
      if total > MAX_ENTRIES:
        raise ValueError(
            f"its object graph expands to more than {MAX_ENTRIES:,} entries (shared "
            "sub-objects nested inside each other); the file is crafted.")
    sizes[key] = total
    return total

  size(obj, 0)


def _first_bad_tensor(obj, name: str = ""):
  """(name, reason) of the first _BadTensor in a graph that passed _check_graph."""
  if isinstance(obj, _BadTensor):
    return name, obj.reason
  for key, value in _children(obj):
    found = _first_bad_tensor(value, f"{name}.{key}" if name else str(key))
    if found:
      return found
  return None


def _check_memo_indices(data: bytes) -> None:
  """Refuses memo indices beyond the pickle's own length before unpickling: CPython's
  unpickler grows (and zero-fills) its memo table to twice the largest index it is
  given, so one 5-byte opcode could claim gigabytes."""
  try:
    for opcode, arg, _ in pickletools.genops(data):
      if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and (
          not isinstance(arg, int) or not 0 <= arg <= len(data)):
        raise pickle.UnpicklingError(f"memo index {arg!r} is out of range")
  except ValueError as e:  # genops' word for a malformed opcode stream
    raise pickle.UnpicklingError(str(e)) from None


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _RestrictedUnpickler(pickle.Unpickler):
  """Builds tensors within `max_elements`: the storages' declared sizes together, and
  the tensors built from them together, each stay within it (a tensor can be rebuilt
  from one storage many times, or broadcast with stride 0, without any storage bytes)."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, max_elements: int):
    super().__init__(file)
    self._archive, self._prefix, self._storages = archive, prefix, {}
    self._script_types: dict[str, type] = {}
    self._max_elements = max_elements
    self._declared = self._built = 0

  def _over_budget(self, what: str, count: int) -> ValueError:
    return ValueError(
        f"its {what} come to at least {count:,} elements, more than the "
        f"{self._max_elements:,} allowed (the size of the model being loaded, or the "
        "loader's limit). The file holds more than these weights, or is crafted; nothing "
        "was loaded.")

  def _rebuild_tensor(self, storage, offset, size, stride, *unused):
    problem = _layout_problem(storage, offset, size, stride)
    if problem:
      return _BadTensor(problem)
    self._built += int(np.prod(size, dtype=object)) if size else 1
    if self._built > self._max_elements:
      raise self._over_budget("tensors", self._built)
    if not size:
      return storage[offset].copy()
    if 0 in size:
      return np.zeros(tuple(size), storage.dtype)
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.ascontiguousarray(view)

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return self._rebuild_tensor
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
    if not (isinstance(pid, tuple) and len(pid) == 5):
      raise pickle.UnpicklingError(f"Unsupported persistent record {pid!r}.")
    kind, storage_type, key, _location, numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"Unsupported persistent record {pid!r}.")
    if not isinstance(numel, int) or numel < 0 or not isinstance(key, str):
      raise pickle.UnpicklingError(f"Storage record {key!r} has an invalid size {numel!r}.")
    if key not in self._storages:
      self._declared += numel
      if self._declared > self._max_elements:
        raise self._over_budget("storages", self._declared)
      member = f"{self._prefix}/data/{key}"
      try:
        stored = self._archive.getinfo(member).file_size
      except KeyError:
        raise pickle.UnpicklingError(f"Storage {key!r} is missing from the archive.") from None
      if stored != numel * storage_type.dtype.itemsize:
        raise pickle.UnpicklingError(
            f"Storage {key!r} holds {stored} bytes, not the {numel} × "
            f"{storage_type.dtype.itemsize} its record declares.")
      raw = self._archive.read(member)
      self._storages[key] = (np.frombuffer(raw, storage_type.dtype, count=numel), storage_type)
    storage, kind_seen = self._storages[key]
    if kind_seen.dtype != storage_type.dtype:
      raise pickle.UnpicklingError(f"Storage {key!r} is declared with two dtypes.")
    return storage


def load(path: str, max_elements: int = _MAX_ELEMENTS):
  """The object graph stored in a torch zip archive (local or gs://), with tensors as
  numpy arrays.

  Bounded before anything is read: the storages may declare at most `max_elements`
  elements in all (a loader that knows its model passes the model's size), the tensors
  built from them as many, data.pkl at most MAX_PICKLE_BYTES, and the graph at most
  MAX_ENTRIES entries and MAX_DEPTH levels. Anything else is a ValueError naming the file.
  """
  with paths.path(path).open("rb") as file:
    if not zipfile.is_zipfile(file):
      raise ValueError(f"{path} is not a torch zip archive (torch ≥ 1.6 format). Re-save it "
                       "with torch.save, or export the weights as .safetensors or .npz.")
    try:
      return _load_archive(file, path, max_elements)
    except (pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError,
            KeyError, IndexError, TypeError, AttributeError, RecursionError, OverflowError,
            UnicodeDecodeError, NotImplementedError, struct.error, zlib.error, OSError) as e:
      raise ValueError(f"{path} is not a readable weights archive ({type(e).__name__}: "
                       f"{e}). Re-save it with torch.save, or export .safetensors or "
                       ".npz.") from None
    except ValueError as e:
      raise ValueError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def _check_member_count(file) -> None:
  """Refuses a zip whose directory lists more than MAX_MEMBERS files, from its end record
  and before zipfile reads the directory (an object per member)."""
  end = zipfile._EndRecData(file)  # pylint: disable=protected-access
  if end is None:
    raise zipfile.BadZipFile("no end of central directory record")
  members = end[zipfile._ECD_ENTRIES_TOTAL]  # pylint: disable=protected-access
  if members > MAX_MEMBERS:
    raise ValueError(f"it is a zip of {members:,} files, more than the {MAX_MEMBERS:,} a "
                     "weights file has (one per storage); nothing was loaded.")
  file.seek(0)


def _load_archive(file, path: str, max_elements: int):
  _check_member_count(file)
  with zipfile.ZipFile(file) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected exactly one */data.pkl in the archive, found "
                       f"{pickles[:5]}.")
    prefix = pickles[0][: -len("/data.pkl")]
    byteorder = f"{prefix}/byteorder"
    if byteorder in archive.namelist():
      if (archive.getinfo(byteorder).file_size > 16
          or archive.read(byteorder).strip() != b"little"):
        raise ValueError(f"{path} was not written little-endian; re-save it on a "
                         "little-endian machine.")
    size = archive.getinfo(pickles[0]).file_size
    if size > MAX_PICKLE_BYTES:
      raise ValueError(f"its data.pkl is {size:,} bytes, more than the "
                       f"{MAX_PICKLE_BYTES:,} any weights file needs; nothing was loaded.")
    data = archive.read(pickles[0])
    _check_memo_indices(data)
    obj = _RestrictedUnpickler(io.BytesIO(data), archive, prefix, max_elements).load()
  _check_graph(obj)
  bad = _first_bad_tensor(obj)
  if bad:
    raise ValueError(f"{path}: tensor {bad[0]!r} does not fit its storage: {bad[1]}. The "
                     "file is damaged or crafted; nothing was loaded.")
  return obj


def flatten_tensors(obj, prefix: str = "") -> dict[str, np.ndarray]:
  """{"a.b.weight": array} for every array reachable through dicts and ScriptObjects
  (of a graph from `load`, which bounds its size)."""
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
