"""Hostile weights files for --mode=convert: each ends in seconds with one line and exit
code 2, and allocates no more than the target model's size.

Every file is built here, byte by byte, in the layout torch.save writes (a zip with
archive/data.pkl and archive/data/<key>), so each can say anything a stranger's file
could: a pickle that shares one object 2^79 times, storages whose declared sizes are
true but enormous, tensors rebuilt again and again from one storage.
"""
import io
import os
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from diffusion_jax import torch_archive
from diffusion_jax.tools import convert
from tests.test_torch_archive import _int  # opcode writers
from tests.test_torch_archive import _str  # opcode writers
from tests.test_torch_archive import _tuple  # opcode writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = b"\x80\x02"
MARK, TUPLE2, EMPTY_LIST, EMPTY_DICT, SETITEM, POP, STOP = (
    b"(", b"\x86", b"]", b"}", b"s", b"0", b".")


def _put(i: int) -> bytes:
  return b"r" + struct.pack("<I", i)


def _get(i: int) -> bytes:
  return b"j" + struct.pack("<I", i)


def _storage(key: str, numel: int) -> bytes:
  return (MARK + _str("storage") + b"ctorch\nFloatStorage\n" + _str(key) + _str("cpu")
          + _int(numel) + b"tQ")


def _tensor_args(key, numel, size, stride) -> bytes:
  """The argument tuple of _rebuild_tensor_v2 (on the stack)."""
  return (MARK + _storage(key, numel) + _int(0) + _tuple(size) + _tuple(stride) + b"\x89"
          + b"ccollections\nOrderedDict\n)R" + b"t")


_REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"


def _zip(pkl: bytes, storages: dict, compress=zipfile.ZIP_STORED) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", b"little")
    for key, raw in storages.items():
      z.writestr(zipfile.ZipInfo(f"archive/data/{key}"), raw, compress_type=compress)
  return buf.getvalue()


def tuple_dag(depth=79) -> bytes:
  """L0 = [], Li = (Li-1, Li-1): 1.4 KB describing 2^79 leaves, as {"w": L_depth}."""
  body = EMPTY_LIST + _put(0) + POP
  for i in range(1, depth + 1):
    body += _get(i - 1) + _get(i - 1) + TUPLE2 + _put(i) + POP
  body += _get(depth)
  return _zip(PROTO + EMPTY_DICT + _str("w") + body + SETITEM + STOP, {})


def dict_dag(depth=60) -> bytes:
  """D0 = {"w": tensor}, Di = {"a": Di-1, "b": Di-1}, as a state_dict entry."""
  body = (EMPTY_DICT + _str("w") + _REBUILD + _tensor_args("0", 4, (4,), (1,)) + b"R"
          + SETITEM + _put(0) + POP)
  for i in range(1, depth + 1):
    body += (EMPTY_DICT + MARK + _str("a") + _get(i - 1) + _str("b") + _get(i - 1) + b"u"
             + _put(i) + POP)
  body += _get(depth)
  return _zip(PROTO + EMPTY_DICT + _str("w") + body + SETITEM + STOP,
              {"0": np.zeros(4, np.float32).tobytes()})


def nested_lists(depth=100_000) -> bytes:
  """[[[...]]] nested 100,000 deep."""
  body = EMPTY_LIST * depth + b"a" * (depth - 1)
  return _zip(PROTO + EMPTY_DICT + _str("w") + body + SETITEM + STOP, {})


def zip_bomb(count=2, numel=2**28) -> bytes:
  """Two deflated storages of 2^28 zero float32 (1 GiB each), sizes declared truly."""
  pkl = PROTO + EMPTY_DICT + MARK
  for i in range(count):
    pkl += _str(f"w{i}") + _REBUILD + _tensor_args(str(i), numel, (numel,), (1,)) + b"R"
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", pkl + b"u" + STOP)
    zero_mb = bytes(1 << 20)
    for i in range(count):
      info = zipfile.ZipInfo(f"archive/data/{i}")
      info.compress_type = zipfile.ZIP_DEFLATED
      with z.open(info, "w", force_zip64=True) as f:
        for _ in range(numel * 4 >> 20):
          f.write(zero_mb)
  return buf.getvalue()


def many_storages(count=5_000, numel=1000) -> bytes:
  """5,000 small storages, 5 × 10^6 elements together."""
  pkl = PROTO + EMPTY_DICT + MARK
  for i in range(count):
    pkl += _str(f"w{i}") + _REBUILD + _tensor_args(str(i), numel, (numel,), (1,)) + b"R"
  raw = bytes(4 * numel)
  return _zip(pkl + b"u" + STOP, {str(i): raw for i in range(count)}, zipfile.ZIP_DEFLATED)


def broadcast_numel() -> bytes:
  """A one-element storage viewed as 2^30 elements with stride 0 (4 GiB once copied)."""
  pkl = (PROTO + EMPTY_DICT + _str("w") + _REBUILD
         + _tensor_args("0", 1, (2**30,), (0,)) + b"R" + SETITEM + STOP)
  return _zip(pkl, {"0": bytes(4)})


def memo_reuse(copies=100_000) -> bytes:
  """One transposed 256×256 view (so each rebuild copies) rebuilt 100,000 times from the
  memoised function and arguments: 26 GB from a 256 KB storage."""
  pkl = (PROTO + EMPTY_DICT + _str("w") + EMPTY_LIST + _put(0) + _REBUILD + _put(1) + POP
         + _tensor_args("0", 65536, (256, 256), (1, 256)) + _put(2) + POP + MARK
         + (_get(1) + _get(2) + b"R") * copies + b"e" + SETITEM + STOP)
  return _zip(pkl, {"0": bytes(4 * 65536)})


def huge_memo_index() -> bytes:
  """LONG_BINPUT 2^32−1: CPython would grow its memo table to 2^33 zeroed slots."""
  return _zip(PROTO + EMPTY_DICT + _put(2**32 - 1) + STOP, {})


def huge_numel_small_zip() -> bytes:
  """A storage that declares 2^40 elements next to a member of 16 bytes."""
  pkl = (PROTO + EMPTY_DICT + _str("w") + _REBUILD + _tensor_args("0", 2**40, (4,), (1,))
         + b"R" + SETITEM + STOP)
  return _zip(pkl, {"0": bytes(16)})


# name: (builder, what the refusal must say)
HOSTILE = {"tuple_dag": (tuple_dag, "expands to more than"),
           "dict_dag": (dict_dag, "expands to more than"),
           "nested_lists": (nested_lists, "deeper than 100 levels"),
           "zip_bomb": (zip_bomb, "storages come to at least"),
           "many_storages": (many_storages, "storages come to at least"),
           "many_members": (lambda: many_storages(20_000, 1), "a zip of 20,002 files"),
           "broadcast_numel": (broadcast_numel, "tensors come to at least"),
           "memo_reuse": (memo_reuse, "tensors come to at least"),
           "huge_memo_index": (huge_memo_index, "memo index 4294967295 is out of range"),
           "huge_numel_small_zip": (huge_numel_small_zip, "storages come to at least")}

# Reads each file given on the command line as convert does for a model of BUDGET
# elements, and prints one line per file: its name, then "refused" or "loaded".
_PEAK_KB = ("int(next(l.split()[1] for l in open('/proc/self/status') "
            "if l.startswith('VmHWM:')))")  # this process's peak RSS (ru_maxrss counts the parent's)

_READER = """
import sys, time
from diffusion_jax.tools import convert
budget = int(sys.argv[1])
for path in sys.argv[2:]:
  t0 = time.perf_counter()
  try:
    convert.read_state_dict(path, budget)
    verdict = "loaded"
  except ValueError as e:
    verdict = "refused " + str(e).replace(chr(10), " ")
  print(path, f"{time.perf_counter() - t0:.2f}", verdict, flush=True)
print("peak_kb", """ + _PEAK_KB + """)
"""


def test_every_hostile_file_is_refused_within_the_models_size(tmp_path):
  files = []
  for name, (build, _) in HOSTILE.items():
    path = tmp_path / f"{name}.pt"
    path.write_bytes(build())
    files.append(str(path))
  budget = 1_388_040  # elements: convert.max_elements of the quickstart model
  baseline = subprocess.run([sys.executable, "-c",
                             f"import diffusion_jax.tools.convert; print({_PEAK_KB})"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
  run = subprocess.run([sys.executable, "-c", _READER, str(budget)] + files, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.strip().splitlines()
  verdicts = {os.path.basename(l.split()[0]): l.split(maxsplit=2)[2] for l in lines[:-1]}
  assert set(verdicts) == {f"{n}.pt" for n in HOSTILE}, run.stdout
  for name, (_, reason) in HOSTILE.items():
    assert verdicts[f"{name}.pt"].startswith("refused") and reason in verdicts[f"{name}.pt"], (
        name, verdicts[f"{name}.pt"])
  # Peak memory above the interpreter with the package imported: under 2× the largest
  # legitimate file for the model (its state_dict in float64, 11 MB here), where reading
  # these files unchecked takes gigabytes (zip_bomb 3.2 GB, broadcast_numel 4.3 GB).
  grown_kb = int(lines[-1].split()[1]) - int(baseline.stdout)
  assert grown_kb < 2 * 8 * budget / 1024, (grown_kb, run.stdout)
  print(f"peak RSS above the import: {grown_kb / 1024:.1f} MB")


def test_the_graph_check_counts_shared_objects_per_use_in_linear_time():
  leaf = []
  for _ in range(79):
    leaf = (leaf, leaf)
  with pytest.raises(ValueError, match="expands to more than"):
    torch_archive._check_graph({"w": leaf})
  loop = []
  loop.append(loop)
  with pytest.raises(ValueError, match="cycle"):
    torch_archive._check_graph(loop)
  shared = np.zeros(3)
  torch_archive._check_graph({"a": shared, "b": shared, "c": [shared] * 1000})


def test_a_state_dict_with_keys_that_are_not_strings_is_refused(tmp_path):
  pkl = (PROTO + EMPTY_DICT + MARK + _int(1) + _REBUILD + _tensor_args("0", 4, (4,), (1,))
         + b"R" + _str("a") + _REBUILD + _tensor_args("0", 4, (4,), (1,)) + b"R" + b"u" + STOP)
  path = tmp_path / "mixed.pt"
  path.write_bytes(_zip(pkl, {"0": bytes(16)}))
  with pytest.raises(ValueError, match="int key 1"):
    convert.read_state_dict(str(path))


def test_npz_and_safetensors_bigger_than_the_model_are_refused_unread(tmp_path):
  buf = io.BytesIO()
  np.savez_compressed(buf, w=np.zeros(2**26, np.float32))  # 256 MB inflated, 250 KB stored
  (tmp_path / "bomb.npz").write_bytes(buf.getvalue())
  with pytest.raises(ValueError, match="inflate to 268,435,"):
    convert.read_state_dict(str(tmp_path / "bomb.npz"), max_elements=1000)
  convert.write_safetensors({"w": np.zeros(2**20, np.float32)}, str(tmp_path / "w.safetensors"))
  with pytest.raises(ValueError, match="more than the"):
    convert.read_state_dict(str(tmp_path / "w.safetensors"), max_elements=1000)
  assert convert.read_state_dict(str(tmp_path / "w.safetensors"), 2**20)["w"].shape == (2**20,)


@pytest.mark.parametrize("name", ["tuple_dag", "zip_bomb"])
def test_convert_refuses_the_reported_files_in_one_line_with_exit_2(name, tmp_path):
  """The two files of the report, through the CLI on the quickstart model."""
  path = tmp_path / f"{name}.pt"
  path.write_bytes(HOSTILE[name][0]())
  wrapper = tmp_path / "main_with_peak_rss.py"  # the CLI, then its peak RSS on stderr
  wrapper.write_text("import runpy, sys\ntry:\n  runpy.run_module('diffusion_jax.main', "
                     "run_name='__main__')\nfinally:\n  print('peak_kb', "
                     f"{_PEAK_KB}, file=sys.stderr)\n")
  cmd = [sys.executable, str(wrapper), "--mode=convert", f"--checkpoint={path}",
         "--config=configs/quickstart.py", f"--workdir={tmp_path / 'wd'}", "--cpu_devices=1"]
  t0 = time.perf_counter()
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
                                DIFFUSION_JAX_ALLOCATOR="system"))
  elapsed = time.perf_counter() - t0
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 2 and lines[0].startswith("error: "), run.stderr  # + the RSS line
  assert "Traceback" not in run.stderr and f"{name}.pt" in lines[0]
  assert HOSTILE[name][1] in lines[0], lines[0]
  assert int(lines[1].split()[1]) < 1024 * 1024, lines  # peak RSS under 1 GB
  assert not (tmp_path / "wd" / "checkpoints").exists()
  print(f"{name}: {elapsed:.1f} s, peak RSS {int(lines[1].split()[1]) / 1024:.0f} MB, {lines[0]}")
