"""One trainer per workdir: a live lock refuses a second trainer; a stale one is taken
over; local and gs:// workdirs."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from diffusion_jax import paths, workdir_lock
from diffusion_jax.workdir_lock import WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize("remote", [False, True])
def test_a_live_lock_refuses_and_a_released_one_is_free(remote, tmp_path, request):
  workdir = request.getfixturevalue("bucket") + "/run" if remote else str(tmp_path)
  with WorkdirLock(workdir) as first:
    holder = json.loads(paths.read_text(first.path))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
      WorkdirLock(workdir).acquire()
  assert not paths.exists(first.path)
  with WorkdirLock(workdir):
    pass


def test_stale_locks_are_taken_over(bucket, tmp_path, monkeypatch):
  lock = paths.path(tmp_path) / workdir_lock.LOCK_FILE
  paths.write_text(lock, json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                     "started": 0, "heartbeat": time.time()}))
  with WorkdirLock(str(tmp_path)):
    assert json.loads(paths.read_text(lock))["pid"] == os.getpid()
  # Another machine's lock: live while its heartbeat is recent, stale after STALE_S.
  remote = paths.path(bucket) / "run" / workdir_lock.LOCK_FILE
  other = {"host": "another-vm", "pid": 1, "started": 0}
  paths.write_text(remote, json.dumps({**other, "heartbeat": time.time()}))
  with pytest.raises(WorkdirLockedError, match="host another-vm"):
    WorkdirLock(f"{bucket}/run").acquire()
  paths.write_text(remote, json.dumps({**other, "heartbeat": time.time() - 1000}))
  with WorkdirLock(f"{bucket}/run"):
    assert json.loads(paths.read_text(remote))["host"] == socket.gethostname()


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  with WorkdirLock(str(tmp_path)) as lock:
    first = json.loads(paths.read_text(lock.path))["heartbeat"]
    time.sleep(0.5)
    assert json.loads(paths.read_text(lock.path))["heartbeat"] > first


def test_a_second_trainer_is_refused_and_the_first_runs_on(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  cmd = [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
         f"--workdir={tmp_path}", "--cpu_devices=1", "--config.train.num_steps=100000",
         "--config.train.checkpoint_every=100000", "--config.train.log_every=1"]
  first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and "loss" in metrics.read_text()):
      time.sleep(0.1)
    t0 = time.time()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert time.time() - t0 < 60
    assert first.poll() is None  # still training
  finally:
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
