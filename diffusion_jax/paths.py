"""The one path layer: every file the project reads or writes, local or `gs://`.

Paths are `etils.epath.Path`s. A local path is made absolute (so a relative workdir
never turns into a folder named `gs:`); a `gs://bucket/...` path goes through gcsfs
(fsspec, no TensorFlow) for files and folders, through TensorStore for Orbax's arrays
and through the Google Cloud C++ client inside ArrayRecord for training records.

Object stores have no append and no rename, so writers here replace whole files:
`write_bytes` writes a local file to a temporary name and renames it; a GCS upload is
atomic by itself. Transient errors (HTTP 408/429/5xx, resets, timeouts) are retried
with exponential backoff inside each client (gcsfs: 6 attempts; TensorStore; the C++
client); tests/test_gcs.py trains through a proxy that fails every 4th request.

The GCS emulator is honoured as the usual variables name it: STORAGE_EMULATOR_HOST
(gcsfs) and TENSORSTORE_GCS_HTTP_URL (TensorStore). When only
STORAGE_EMULATOR_HOST is set, the other clients are pointed at the same server.
"""
from __future__ import annotations

import io
import os
from typing import Union
import zipfile

from etils import epath
import fsspec
import fsspec.config
import numpy as np

PathLike = Union[str, os.PathLike]


def configure_gcs_clients() -> None:
  """Settings for the three GCS clients (idempotent; runs on import).

  gcsfs's experimental zonal/hierarchical-bucket probing is off unless asked for: it
  needs a control API the emulator lacks and plain buckets do not use.
  """
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  # Other processes write the same workdir (the trainer, other hosts, TensorStore), so
  # folder listings must not be cached: a stale one hides new checkpoints.
  fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", host)  # ArrayRecord's client


configure_gcs_clients()


def is_remote(p: PathLike) -> bool:
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: absolute when local, unchanged when a URL (gs://...)."""
  if isinstance(p, epath.Path) and is_remote(p):
    return p
  s = os.fspath(p)
  if not s:
    raise ValueError("An empty path was given where a file or folder is needed.")
  return epath.Path(s if is_remote(s) else os.path.abspath(os.path.expanduser(s)))


def makedirs(p: PathLike) -> epath.Path:
  d = path(p)
  d.mkdir(parents=True, exist_ok=True)
  return d


def write_bytes(p: PathLike, data: bytes) -> epath.Path:
  """Replaces the file at `p` with `data` as one step (readers see old or new, whole)."""
  target = path(p)
  if is_remote(target):
    target.write_bytes(data)
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
  tmp.write_bytes(data)
  os.replace(tmp, target)
  return target


def write_text(p: PathLike, text: str) -> epath.Path:
  return write_bytes(p, text.encode("utf-8"))


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return read_bytes(p).decode("utf-8")


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def is_regular_file(p: PathLike) -> bool:
  """Whether `p` is a regular file (a FIFO, socket or device is not; epath's is_file
  says yes to anything that is not a folder)."""
  target = path(p)
  return target.is_file() if is_remote(target) else os.path.isfile(target)


def move(src: PathLike, dst: PathLike) -> epath.Path:
  """Moves file or folder `src` to `dst` (on GCS: copies the objects, then deletes)."""
  source, target = path(src), path(dst)
  if is_remote(source):
    fs = fsspec.filesystem("gs")
    fs.mv(os.fspath(source), os.fspath(target), recursive=True)
  else:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)
  return target


def save_npz(p: PathLike, **arrays) -> epath.Path:
  """np.savez to any path (arrays only; loaded back with allow_pickle=False)."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return write_bytes(p, buf.getvalue())


def load_npz(p: PathLike, max_bytes: int | None = None) -> dict[str, np.ndarray]:
  """Every array of an .npz; object (pickled) arrays are refused by numpy. With
  `max_bytes`, an archive whose members inflate to more is refused before inflating."""
  data = io.BytesIO(read_bytes(p))
  if max_bytes is not None:
    with zipfile.ZipFile(data) as archive:
      total = sum(info.file_size for info in archive.infolist())
    if total > max_bytes:
      raise ValueError(f"its arrays inflate to {total:,} bytes, more than the {max_bytes:,} "
                       "allowed here; nothing was read")
  with np.load(data, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def save_figure(fig, p: PathLike, dpi: int = 100) -> str:
  """A matplotlib figure as PNG at `p`; returns the path as a string."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  return os.fspath(write_bytes(p, buf.getvalue()))


class StorageError(OSError):
  """A workdir or data path that cannot be used (the message says why and what to do)."""


def check_writable(p: PathLike, role: str = "--workdir") -> epath.Path:
  """Creates folder `p` and writes/deletes a probe object; StorageError explains failures.

  Run before anything compiles, so a missing bucket, missing credentials or a denied
  permission cost seconds, not a compile.
  """
  d = path(p)
  probe = d / f".write_probe_{os.getpid()}"
  try:
    makedirs(d)
    write_bytes(probe, b"ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"{role}={os.fspath(p)} is not writable: {_explain(e, d)}") from None
  return d


def _explain(e: BaseException, p: PathLike) -> str:
  """One line on why storage access to `p` failed, and the fix."""
  text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
  if not is_remote(p):
    return f"{text}. Choose a folder you can write to."
  bucket = os.fspath(p).split("://", 1)[1].split("/", 1)[0]
  low = text.lower()
  if isinstance(e, FileNotFoundError) or "404" in low or "not found" in low:
    return (f"{text}. Check that the bucket gs://{bucket} exists (`gcloud storage "
            f"buckets create gs://{bucket}`).")
  if isinstance(e, PermissionError) or "403" in low or "401" in low or "permission" in low:
    return (f"{text}. The account in use lacks access to gs://{bucket}: grant it "
            "roles/storage.objectUser on the bucket.")
  if "credential" in low or "token" in low or "auth" in low:
    return (f"{text}. No Google Cloud credentials were found: run `gcloud auth "
            "application-default login`, or run on a VM with a service account.")
  return f"{text}. Check the bucket name, network access and credentials."
