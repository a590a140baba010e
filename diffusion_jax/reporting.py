"""What a run writes for people: JSONL + TensorBoard scalars, PNG grids, loss curves, and
the console's elapsed-time line for work without steps of its own (compiling)."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

from diffusion_jax import paths


def image_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
  """uint8 (N, H, W, C) -> one uint8 (rows·(H+pad)+pad, cols·(W+pad)+pad, C) grid."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return grid


def save_png(array: np.ndarray, path, scale: int = 1) -> str:
  """uint8 (H, W, C) as a PNG at `path` (local or gs://); returns the path."""
  img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return os.fspath(paths.write_bytes(path, buf.getvalue()))


METRICS_FILE = "metrics.jsonl"
FINAL_SAMPLES = "samples.png"  # the grid drawn when training finishes


class MetricWriter:
  """Scalars to WORKDIR/metrics.jsonl and TensorBoard; image grids to PNG and TensorBoard.

  metrics.jsonl holds one JSON row per step, in step order. Object stores cannot
  append, so the writer keeps the rows and replaces the whole file at each `flush`:
  the training loop flushes at checkpoints and at the end, and writes flush when
  `flush_every_s` has passed (default: at every write for a local workdir, every 30 s
  for gs://). Rows are merged by step. A resumed run passes the restored
  step as `resume_step`: rows logged after it, by a run that died before its next
  checkpoint, are dropped and logged again, so no step is repeated or out of order.
  """

  def __init__(self, workdir, enabled: bool = True, resume_step: int | None = None,
               flush_every_s: float | None = None):
    self.workdir, self.enabled = paths.path(workdir), enabled
    if flush_every_s is None:
      flush_every_s = 30.0 if paths.is_remote(self.workdir) else 0.0
    self._flush_every_s = flush_every_s
    self._rows: dict[int, dict] = {}
    self._tb = None
    self._dirty, self._last_flush = False, time.monotonic()
    if not enabled:
      return
    for row in read_metrics(self.workdir):
      if resume_step is None or row["step"] <= resume_step:
        self._rows.setdefault(row["step"], {}).update(row)
    self._dirty = resume_step is not None
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # TensorBoard events go to a local folder first when the workdir is remote: they are
    # uploaded whole at each flush, like metrics.jsonl (no append on object stores).
    self._tb_dir = (tempfile.mkdtemp(prefix="tensorboard_") if paths.is_remote(self.workdir)
                    else os.fspath(self.workdir / "tensorboard"))
    # purge_step hides the events a dead run logged after the restored checkpoint.
    self._tb = SummaryWriter(self._tb_dir, flush_secs=3600,
                             purge_step=None if resume_step is None else resume_step + 1)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    self._rows.setdefault(int(step), {"step": int(step)}).update(
        {k: float(v) for k, v in scalars.items()})
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._dirty = True
    if time.monotonic() - self._last_flush >= self._flush_every_s:
      self.flush()

  def latest(self, key: str) -> float | None:
    """The last value logged for scalar `key` in this workdir (earlier runs included),
    or None."""
    steps = [step for step, row in self._rows.items() if key in row]
    return self._rows[max(steps)][key] if steps else None

  def write_text(self, step: int, name: str, text: str) -> None:
    """A note at `step`: in its metrics.jsonl row (as a string) and in TensorBoard."""
    if not self.enabled:
      return
    self._rows.setdefault(int(step), {"step": int(step)})[name] = text
    self._tb.add_text(name, text, int(step))
    self._dirty = True

  def flush(self) -> None:
    """Writes metrics.jsonl and the TensorBoard events out now."""
    if not self.enabled:
      return
    if self._dirty:
      lines = [json.dumps(self._rows[s]) + "\n" for s in sorted(self._rows)]
      paths.write_text(self.workdir / METRICS_FILE, "".join(lines))
      self._dirty = False
    self._tb.flush()
    if paths.is_remote(self.workdir):
      for name in os.listdir(self._tb_dir):
        with open(os.path.join(self._tb_dir, name), "rb") as f:
          paths.write_bytes(self.workdir / "tensorboard" / name, f.read())
    self._last_flush = time.monotonic()

  def write_image_grid(self, step: int, images: np.ndarray, final: bool = False) -> str:
    """Saves samples_<step>.png (and samples.png when final); returns the path."""
    if not self.enabled:
      return ""
    grid = image_grid(images)
    scale = max(1, 256 // images.shape[1])
    path = save_png(grid, self.workdir / f"samples_{step:07d}.png", scale)
    if final:
      save_png(grid, self.workdir / FINAL_SAMPLES, scale)
    self._tb.add_image("samples", grid, int(step), dataformats="HWC")
    return path

  def close(self) -> None:
    if self._tb is not None:
      self.flush()
      self._tb.close()
      if paths.is_remote(self.workdir):
        shutil.rmtree(self._tb_dir, ignore_errors=True)
      self._tb = None


def read_metrics(workdir) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (empty when there is none)."""
  path = paths.path(workdir) / METRICS_FILE
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def plot_loss_curve(workdir: str) -> str:
  """loss_curve.png: the training loss and each timestep quarter's loss against step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  path = paths.path(workdir) / "loss_curve.png"
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  steps = [r["step"] for r in rows]
  axes[0].plot(steps, [r["loss"] for r in rows], label="loss (weighted)")
  axes[0].plot(steps, [r["mse"] for r in rows], label="mse term", alpha=0.7)
  axes[0].set(xlabel="step", ylabel="loss", yscale="log", title="Training loss")
  axes[0].legend()
  for q, name in enumerate(["t∈[0,T/4)", "[T/4,T/2)", "[T/2,3T/4)", "[3T/4,T)"]):
    pts = [(r["step"], r[f"loss_q{q}"]) for r in rows if f"loss_q{q}" in r]
    if pts:
      axes[1].plot(*zip(*pts), label=name)
  axes[1].set(xlabel="step", ylabel="loss", yscale="log", title="Loss per timestep quarter")
  axes[1].legend()
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)
  return os.fspath(path)


def duration(seconds: float) -> str:
  """`seconds` for people: "7 min 05 s", "42 s", "1 h 02 min"."""
  minutes, sec = divmod(round(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  if hours:
    return f"{hours} h {minutes:02d} min"
  return f"{minutes} min {sec:02d} s" if minutes else f"{sec} s"


class Spinner:
  """`with Spinner("compiling the sampler"):` shows what runs and for how long.

  On a terminal the line turns and counts seconds (twice a second) and ends as
  "compiling the sampler: 12.3 s"; in a log file it writes that final line only, so
  logs get one line, not hundreds. Writes to stdout, with the run's other messages.
  """

  FRAMES = "|/-\\"

  def __init__(self, what: str, enabled: bool = True, stream=None):
    self.what, self.enabled = what, enabled
    self.stream = stream or sys.stdout
    self._stop = threading.Event()
    self._thread = None
    self.start = 0.0

  def _turn(self) -> None:
    frame = 0
    while not self._stop.wait(0.5):
      frame += 1
      self.stream.write(f"\r{self.FRAMES[frame % 4]} {self.what}… "
                        f"{time.time() - self.start:.0f} s")
      self.stream.flush()

  def __enter__(self):
    self.start = time.time()
    if self.enabled and getattr(self.stream, "isatty", lambda: False)():
      self._thread = threading.Thread(target=self._turn, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self.stream.write("\r\033[K")  # clears the turning line
    if self.enabled:
      state = "" if exc[0] is None else " (stopped)"
      self.stream.write(f"{self.what}: {time.time() - self.start:.1f} s{state}\n")
      self.stream.flush()
    return False
