"""Reading .pt / .safetensors / .npz is a security boundary: crafted files with bad
offsets, sizes, strides, storages or headers give one clean error, never a crash and
never bytes from outside the file.

Archives are written here opcode by opcode, in the layout torch.save uses, so each field
of a tensor record can be set to any value; torch (the test-only oracle) checks that the
well-formed ones are what torch itself reads.
"""
import io
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from diffusion_jax import torch_archive
from diffusion_jax.tools import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _str(s: str) -> bytes:
  data = s.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _int(v: int) -> bytes:
  if -2**31 <= v < 2**31:
    return b"J" + struct.pack("<i", v)
  data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(data)]) + data


def _tuple(items) -> bytes:
  return b"(" + b"".join(_int(i) for i in items) + b"t"


def _tensor(key, numel, offset, size, stride, storage="FloatStorage") -> bytes:
  pid = (b"(" + _str("storage") + b"ctorch\n" + storage.encode() + b"\n" + _str(key)
         + _str("cpu") + _int(numel) + b"tQ")
  return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + _int(offset) + _tuple(size)
          + _tuple(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR")


def _archive(tensors: dict, storages: dict) -> bytes:
  """A torch zip archive: {name: _tensor(...)} and {key: raw bytes}."""
  pkl = b"\x80\x02}(" + b"".join(_str(k) + v for k, v in tensors.items()) + b"u."
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", b"little")
    z.writestr("archive/version", b"3\n")
    for key, raw in storages.items():
      z.writestr(f"archive/data/{key}", raw)
  return buf.getvalue()


_STORAGE = np.arange(12, dtype=np.float32)


def _one(offset=0, size=(3, 4), stride=(4, 1), numel=12, raw=_STORAGE.tobytes(),
         storage="FloatStorage"):
  return _archive({"w": _tensor("0", numel, offset, size, stride, storage)}, {"0": raw})


def test_crafted_archives_that_are_well_formed_read_as_torch_reads_them(tmp_path):
  cases = {"plain": _one(), "transposed": _one(size=(4, 3), stride=(1, 4)),
           "offset_view": _one(offset=4, size=(2, 4), stride=(4, 1)),
           "broadcast": _one(size=(5, 3), stride=(0, 1)), "empty": _one(size=(0, 4)),
           "scalar": _one(offset=11, size=(), stride=())}
  for name, data in cases.items():
    path = tmp_path / f"{name}.pt"
    path.write_bytes(data)
    expected = torch.load(path, weights_only=True)["w"].numpy()
    np.testing.assert_array_equal(torch_archive.load(str(path))["w"], expected, err_msg=name)


BAD_ARCHIVES = {
    "stride past the end": _one(size=(3, 4), stride=(5, 1)),
    "offset past the end": _one(offset=1, size=(3, 4), stride=(4, 1)),
    "small overrun": _one(offset=0, size=(13,), stride=(1,)),
    "huge size": _one(size=(2**40, 2**40), stride=(1, 1)),
    "huge stride": _one(size=(2, 2), stride=(2**60, 1)),
    "negative size": _one(size=(-1, 4), stride=(4, 1)),
    "negative stride": _one(size=(3, 4), stride=(-4, 1)),
    "negative offset": _one(offset=-4, size=(2, 4), stride=(4, 1)),
    "scalar offset past the end": _one(offset=12, size=(), stride=()),
    "size and stride lengths differ": _one(size=(3, 4), stride=(4,)),
    "storage shorter than numel": _one(numel=100),
    "negative numel": _one(numel=-1),
    "storage file missing": _archive({"w": _tensor("9", 12, 0, (3, 4), (4, 1))},
                                     {"0": _STORAGE.tobytes()}),
    "unknown storage type": _one(storage="EvilStorage"),
    "storage shared, second view overruns": _archive(
        {"a": _tensor("0", 12, 0, (3, 4), (4, 1)), "b": _tensor("0", 12, 6, (2, 4), (4, 1))},
        {"0": _STORAGE.tobytes()}),
    "odd byte count for the dtype": _one(raw=_STORAGE.tobytes()[:-1], numel=12),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_crafted_bad_tensors_are_refused_cleanly(case, tmp_path):
  path = tmp_path / "bad.pt"
  path.write_bytes(BAD_ARCHIVES[case])
  with pytest.raises(ValueError) as err:
    torch_archive.load(str(path))
  assert "bad.pt" in str(err.value)
  if case not in ("unknown storage type", "storage file missing", "negative numel",
                  "storage shorter than numel", "odd byte count for the dtype"):
    assert "tensor 'w'" in str(err.value) or "tensor 'b'" in str(err.value), err.value


def test_truncated_and_garbled_archives_are_refused_cleanly(tmp_path):
  good = _one()
  rng = np.random.default_rng(0)
  for i, cut in enumerate([10, len(good) // 2, len(good) - 5]):
    path = tmp_path / f"cut{i}.pt"
    path.write_bytes(good[:cut])
    with pytest.raises(ValueError):
      torch_archive.load(str(path))
  for i in range(40):  # random byte flips: a clean error or a correct read, never a crash
    data = bytearray(good)
    for j in rng.integers(0, len(data), 3):
      data[j] = int(rng.integers(0, 256))
    path = tmp_path / f"flip{i}.pt"
    path.write_bytes(bytes(data))
    try:
      out = torch_archive.load(str(path))
    except ValueError:
      continue
    assert all(np.all(np.isin(v, _STORAGE)) for v in out.values()
               if isinstance(v, np.ndarray) and v.dtype == np.float32)


def test_the_overrun_of_the_report_is_refused_by_convert_naming_the_tensor(tmp_path):
  """The reported case: a .pt whose tensor reads past its storage converted with exit 0
  and heap bytes in the checkpoint. It must fail, naming the tensor, in a child process
  so that a crash would show as a signal exit code."""
  path = tmp_path / "ema_0.9999_000010.pt"
  path.write_bytes(_archive({"input_blocks.0.0.weight": _tensor("0", 12, 8, (64,), (1,))},
                            {"0": _STORAGE.tobytes()}))
  run = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--mode=convert", f"--checkpoint={path}",
       "--config=tests/tiny_config.py", f"--workdir={tmp_path / 'wd'}", "--cpu_devices=1"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300)
  assert run.returncode not in (0, -11, 139), run.stderr[-2000:]
  assert "input_blocks.0.0.weight" in run.stderr
  assert not (tmp_path / "wd" / "checkpoints").exists()


def _safetensors(header: dict, data: bytes, header_len=None) -> bytes:
  head = json.dumps(header).encode()
  return struct.pack("<Q", len(head) if header_len is None else header_len) + head + data


BAD_SAFETENSORS = {
    "offsets past the end": _safetensors({"w": {"dtype": "F32", "shape": [4],
                                                "data_offsets": [0, 64]}}, bytes(16)),
    "end before start": _safetensors({"w": {"dtype": "F32", "shape": [0],
                                            "data_offsets": [8, 4]}}, bytes(16)),
    "shape does not match the bytes": _safetensors(
        {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, bytes(16)),
    "negative shape": _safetensors({"w": {"dtype": "F32", "shape": [-4],
                                          "data_offsets": [0, 16]}}, bytes(16)),
    "header length past the end": _safetensors({}, b"", header_len=2**40),
    "unknown dtype": _safetensors({"w": {"dtype": "F128", "shape": [1],
                                         "data_offsets": [0, 16]}}, bytes(16)),
    "not a dict entry": _safetensors({"w": [1, 2]}, bytes(16)),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_crafted_safetensors_are_refused_cleanly(case, tmp_path):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(BAD_SAFETENSORS[case])
  with pytest.raises(ValueError, match="bad.safetensors"):
    convert.read_safetensors(str(path))


def test_a_truncated_npz_is_refused_cleanly(tmp_path):
  buf = io.BytesIO()
  np.savez(buf, w=np.arange(1000, dtype=np.float32))
  path = tmp_path / "bad.npz"
  path.write_bytes(buf.getvalue()[:300])
  with pytest.raises(ValueError, match="bad.npz"):
    convert.read_state_dict(str(path))
