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

from diffusion_jax import paths
from diffusion_jax.training import workdir_lock
from diffusion_jax.training.workdir_lock import WorkdirLock
from diffusion_jax.training.workdir_lock import WorkdirLockedError

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


# Runs in a fresh interpreter (no JAX threads to fork): 100 forked contenders race for a
# stale lock, three times; prints the number of winners of each race.
_RACE = """
import json, multiprocessing, os, random, socket, subprocess, sys, time
from diffusion_jax.training import workdir_lock
from diffusion_jax.training.workdir_lock import WorkdirLock, WorkdirLockedError


def contend(workdir, start, attempted, results):
  # Judging staleness is slowed by a random 0-20 ms, as on a loaded machine, so that
  # contenders interleave between reading the stale lock and replacing it.
  judge = workdir_lock._stale_reason
  workdir_lock._stale_reason = lambda *a: (time.sleep(random.uniform(0, 0.02)), judge(*a))[1]
  start.wait()
  try:
    lock = WorkdirLock(workdir)
    lock.acquire()
    won = True
  except WorkdirLockedError:
    won = False
  results.put(won)
  attempted.wait()  # a winner holds the lock until every contender has tried
  if won:
    lock.release()


ctx, n, winners = multiprocessing.get_context("fork"), 100, []
for trial in range(3):
  workdir = os.path.join(sys.argv[1], f"run{trial}")
  os.makedirs(workdir)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": 0,
               "heartbeat": 0}, f)
  start, attempted, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
  procs = [ctx.Process(target=contend, args=(workdir, start, attempted, results))
           for _ in range(n)]
  for p in procs:
    p.start()
  outcomes = [results.get(timeout=120) for _ in range(n)]
  for p in procs:
    p.join(timeout=60)
    assert p.exitcode == 0, p.exitcode
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE + ".takeover"))
  winners.append(sum(outcomes))
print(json.dumps(winners))
"""


def test_of_100_contenders_for_a_stale_lock_exactly_one_wins(tmp_path):
  race = subprocess.run([sys.executable, "-c", _RACE, str(tmp_path)], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                        text=True, timeout=600)
  assert race.returncode == 0, race.stderr[-3000:]
  assert json.loads(race.stdout.strip().splitlines()[-1]) == [1, 1, 1], race.stderr[-2000:]


@pytest.mark.parametrize("content", [b"", b"[]", b'{"pid": "x"}', b'{"host": "h", "pi'])
def test_a_lock_without_a_record_is_stale_once_old_and_waited_on_while_new(
    content, tmp_path, monkeypatch):
  lock = tmp_path / workdir_lock.LOCK_FILE
  lock.write_bytes(content)
  monkeypatch.setattr(workdir_lock, "ACQUIRE_S", 0.5)
  with pytest.raises(WorkdirLockedError, match=f"delete {lock}"):  # maybe being written
    WorkdirLock(str(tmp_path)).acquire()
  old = time.time() - workdir_lock.UNREADABLE_STALE_S - 5
  os.utime(lock, (old, old))
  with WorkdirLock(str(tmp_path)):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
