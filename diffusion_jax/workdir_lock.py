"""One trainer per workdir: WORKDIR/trainer.lock, a small JSON object naming its holder.

The holder (process 0 of a training job) writes {host, pid, started, heartbeat} and
refreshes `heartbeat` every HEARTBEAT_S seconds from a background thread; it deletes the
lock when it stops, including after SIGTERM, Ctrl-C and errors. A second trainer finds
a live lock and is refused with a message naming the holder. A lock is stale, and is
taken over with a warning, when its holder is a dead process on this host, or when its
heartbeat is older than STALE_S (a holder killed on another machine, e.g. a preempted
VM that was re-created).

Local workdirs create the lock atomically (O_CREAT | O_EXCL). On gs:// the check and the
write are two requests, so two trainers started within the same second can both pass;
after that, the second one sees the first one's heartbeat.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from absl import logging

from diffusion_jax import paths

LOCK_FILE = "trainer.lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _stale_reason(holder: dict, now: float) -> str | None:
  """Why `holder`'s lock no longer protects anything, or None while it is live."""
  if holder.get("host") == socket.gethostname():
    return None if _pid_alive(int(holder.get("pid", -1))) else "its process has exited"
  age = now - float(holder.get("heartbeat", 0))
  return f"its heartbeat is {age:.0f} s old" if age > STALE_S else None


class WorkdirLock:
  """Context manager holding WORKDIR/trainer.lock for one training run."""

  def __init__(self, workdir, enabled: bool = True):
    self.path = paths.path(workdir) / LOCK_FILE
    self.enabled = enabled
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    self._stop = threading.Event()
    self._thread = None

  def _payload(self) -> bytes:
    return json.dumps({**self._record, "heartbeat": time.time()}).encode()

  def _create_local(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(self._payload())
    return True

  def acquire(self) -> None:
    if not self.enabled:
      return
    for _ in range(3):
      if paths.is_remote(self.path):
        if not paths.exists(self.path):
          paths.write_bytes(self.path, self._payload())
          break
      elif self._create_local():
        break
      try:
        holder = json.loads(paths.read_text(self.path))
      except (FileNotFoundError, ValueError):  # removed or half-written meanwhile
        time.sleep(0.2)
        continue
      reason = _stale_reason(holder, time.time())
      if reason is None:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        raise WorkdirLockedError(
            f"{self.path.parent} is being trained by another process (host "
            f"{holder.get('host')}, pid {holder.get('pid')}, since {started}). Stop it "
            "first, or use another --workdir. If that process is gone, delete "
            f"{self.path}.")
      logging.warning("Taking over the stale lock %s (%s).", self.path, reason)
      self.path.unlink(missing_ok=True)
    else:
      raise WorkdirLockedError(f"Could not take {self.path}; another trainer is starting.")
    self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        paths.write_bytes(self.path, self._payload())
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    if not self.enabled or self._thread is None:
      return
    self._stop.set()
    self._thread.join(timeout=10)
    try:
      self.path.unlink(missing_ok=True)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Could not remove %s: %s", self.path, e)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False
