"""A training process killed with SIGKILL at a random moment after its first checkpoint."""
import pathlib
import random
import signal
import subprocess
import time


def kill_after_first_checkpoint(cmd, workdir, env, cwd, max_delay_s: float) -> list[int]:
  """Runs `cmd`, waits for a checkpoint step folder in WORKDIR/checkpoints, sleeps up to
  `max_delay_s`, SIGKILLs it and returns the saved steps."""
  proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt = pathlib.Path(workdir) / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpt.exists() and any(
      p.name.isdigit() for p in ckpt.iterdir())):
    time.sleep(0.01)
  time.sleep(random.uniform(0.0, max_delay_s))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
