"""The host memory allocator of the command-line processes: tcmalloc where it is installed.

XLA:CPU allocates each execution's temporary buffer afresh (about 0.5 GB for the small32
train step) and frees it afterwards. glibc serves blocks that large with a new mmap and
returns them to the kernel on free, so every step faults in and zeroes every page again:
on the project's 2-core machine about 130,000 page faults and 0.2 s of kernel time per
step. tcmalloc keeps the freed block and hands it back next step; the train step ran
18–35% faster under it (PERF_NOTES.md). The allocator has to be chosen before the
process starts, so the entry points (`python -m diffusion_jax.main`, `.bench`) re-execute
themselves once with the library in LD_PRELOAD.

  DIFFUSION_JAX_ALLOCATOR=system   keep the system allocator (no re-execution)

Debian/Ubuntu package: libtcmalloc-minimal4. Without it the processes run unchanged.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Callable
from typing import Mapping
from typing import Sequence

ENV = "DIFFUSION_JAX_ALLOCATOR"
LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # as ctypes.util.find_library names them


def find_tcmalloc() -> str | None:
  """The soname of an installed tcmalloc ("libtcmalloc_minimal.so.4"), or None.

  Asks the loader's cache (ldconfig); never loads the library into this process, where
  it would free blocks that glibc allocated.
  """
  for name in LIBRARIES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def tcmalloc_command(argv: Sequence[str], environ: Mapping[str, str],
                     find: Callable[[], str | None] = find_tcmalloc
                     ) -> tuple[list[str], dict[str, str]] | None:
  """(argv, environment) that re-run this process under tcmalloc, or None to go on as is.

  argv: the original command line (`sys.orig_argv`). None when `ENV` is already set
  (opted out, or this is the re-executed process), when LD_PRELOAD already names a
  tcmalloc, on a platform without LD_PRELOAD, or when no tcmalloc is installed.
  """
  if not sys.platform.startswith("linux") or environ.get(ENV):
    return None
  preload = environ.get("LD_PRELOAD", "")
  if "tcmalloc" in preload:
    return None
  library = find()
  if library is None:
    return None
  env = dict(environ, LD_PRELOAD=f"{library} {preload}".strip(), **{ENV: "tcmalloc"})
  return [sys.executable, *argv[1:]], env


def use_tcmalloc() -> None:
  """Re-executes this process under tcmalloc when `tcmalloc_command` says so.

  Call first thing in a `__main__` block, before JAX allocates anything; the process
  keeps its PID, arguments and environment (plus LD_PRELOAD and `ENV`).
  """
  command = tcmalloc_command(sys.orig_argv, os.environ)
  if command is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, *command)


def environment_for_other_programs(environ: Mapping[str, str], host_allocator: str = "system",
                                   find: Callable[[], str | None] | None = None
                                   ) -> dict[str, str]:
  """`environ` for a child process that is not ours (the official baseline).

  host_allocator: "system" removes the tcmalloc that `use_tcmalloc` added, so the child
  runs with the allocator its own users get; "tcmalloc" preloads tcmalloc for it as for
  ours, so that a comparison of the two steps is not one of allocators.
  find: where tcmalloc is (default `find_tcmalloc`). Raises ValueError for another
  allocator name, or for "tcmalloc" when none is installed.
  """
  if host_allocator not in ("system", "tcmalloc"):
    raise ValueError(f"host allocator {host_allocator!r}: choose 'system' or 'tcmalloc'.")
  env = dict(environ)
  if env.pop(ENV, None) == "tcmalloc":
    kept = [p for p in env.get("LD_PRELOAD", "").split() if "tcmalloc" not in p]
    if kept:
      env["LD_PRELOAD"] = " ".join(kept)
    else:
      env.pop("LD_PRELOAD", None)
  if host_allocator == "tcmalloc" and "tcmalloc" not in env.get("LD_PRELOAD", ""):
    library = (find or find_tcmalloc)()
    if library is None:
      raise ValueError("tcmalloc is not installed (Debian/Ubuntu: apt-get install "
                       "libtcmalloc-minimal4); use the system allocator instead.")
    env["LD_PRELOAD"] = f"{library} {env.get('LD_PRELOAD', '')}".strip()
  return env


def in_use() -> str:
  """"tcmalloc" when a tcmalloc library is mapped into this process, else "system"."""
  try:
    with open("/proc/self/maps", encoding="utf-8") as maps:  # this process, not a user path
      return "tcmalloc" if "tcmalloc" in maps.read() else "system"
  except OSError:
    return "system"
