"""One trainer per workdir: WORKDIR/trainer.lock, a small JSON object naming its holder.

The holder (process 0 of a training job) writes {host, pid, started, heartbeat} and
refreshes `heartbeat` every HEARTBEAT_S seconds from a background thread; it deletes the
lock when it stops, including after SIGTERM, Ctrl-C and errors. A second trainer finds
a live lock and is refused with a message naming the holder. A lock is stale, and is
taken over with a warning, when its holder is a dead process on this host, or when its
heartbeat is older than STALE_S (a holder killed on another machine, e.g. a preempted
VM that was re-created).

A lock whose content cannot be parsed (empty, cut short, not a JSON object) is stale
once it is UNREADABLE_STALE_S old: writers put the whole record in one write, so only a
writer that died mid-write leaves one.

Local workdirs create the lock atomically (O_CREAT | O_EXCL), and a stale lock is taken
over under a claim file, itself created with O_EXCL: the one contender that creates it
re-reads the lock, replaces it only if it is still the stale one it judged, and removes
the claim, so of any number of contenders exactly one takes the workdir. A claim left
by a contender that died holding it is cleared after CLAIM_ABANDONED_S. On gs:// the
check and the write are two requests, so two trainers started within the same second
can both pass; after that, the second one sees the first one's heartbeat.
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
UNREADABLE_STALE_S = 10.0
CLAIM_ABANDONED_S = 60.0
ACQUIRE_S = 30.0  # how long to wait out a lock being written or taken over


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


def _parse(raw: bytes) -> dict | None:
  """The holder record of a lock file's bytes, or None when they are not one."""
  try:
    holder = json.loads(raw)
    if not isinstance(holder, dict):
      return None
    int(holder.get("pid", -1))  # the fields _stale_reason reads must parse
    float(holder.get("heartbeat", 0))
    return holder
  except (ValueError, TypeError, RecursionError):
    return None


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

  def _read(self) -> bytes | None:
    try:
      return paths.read_bytes(self.path)
    except FileNotFoundError:
      return None

  def _age(self, p) -> float:
    try:
      return time.time() - paths.path(p).stat().mtime
    except FileNotFoundError:
      return 0.0

  def acquire(self) -> None:
    if not self.enabled:
      return
    deadline = time.time() + ACQUIRE_S
    while True:
      if paths.is_remote(self.path):
        if not paths.exists(self.path):
          paths.write_bytes(self.path, self._payload())
          break
      elif self._create_local():
        break
      raw = self._read()
      if raw is None:  # released meanwhile
        continue
      holder = _parse(raw)
      if holder is not None:
        reason = _stale_reason(holder, time.time())
        if reason is None:
          started = time.strftime("%Y-%m-%d %H:%M:%S",
                                  time.localtime(float(holder.get("started", 0) or 0)))
          raise WorkdirLockedError(
              f"{self.path.parent} is being trained by another process (host "
              f"{holder.get('host')}, pid {holder.get('pid')}, since {started}). Stop it "
              "first, or use another --workdir. If that process is gone, delete "
              f"{self.path}.")
      else:
        age = self._age(self.path)
        reason = (f"it holds no lock record ({len(raw)} bytes) and is {age:.0f} s old"
                  if age > UNREADABLE_STALE_S else None)
      if reason is not None and self._take_over(raw, reason):
        break
      if time.time() > deadline:
        raise WorkdirLockedError(
            f"Could not take {self.path} within {ACQUIRE_S:.0f} s: another trainer is "
            f"starting or taking it over. If no trainer runs on {self.path.parent}, delete "
            f"{self.path} and run again.")
      time.sleep(0.1)
    self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
    self._thread.start()

  def _take_over(self, stale: bytes, reason: str) -> bool:
    """Replaces the lock, if it still holds the bytes `stale`, with this one's; True when
    this process now holds it."""
    if paths.is_remote(self.path):
      logging.warning("Taking over the stale lock %s (%s).", self.path, reason)
      self.path.unlink(missing_ok=True)
      return False  # the loop writes the new lock
    claim = self.path.parent / f"{LOCK_FILE}.takeover"
    try:
      fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      if self._age(claim) > CLAIM_ABANDONED_S:
        logging.warning("Removing %s, left by a trainer that died taking over the lock.",
                        claim)
        claim.unlink(missing_ok=True)
      return False
    try:
      os.close(fd)
      if self._read() != stale:  # another contender took it over first
        return False
      logging.warning("Taking over the stale lock %s (%s).", self.path, reason)
      self.path.unlink(missing_ok=True)
      return self._create_local()
    finally:
      claim.unlink(missing_ok=True)

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
