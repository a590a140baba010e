"""What a run writes for people: JSONL + TensorBoard scalars, PNG grids and loss curves."""
from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image


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


def save_png(array: np.ndarray, path: str, scale: int = 1) -> None:
  img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  img.save(path)


class MetricWriter:
  """Scalars to WORKDIR/metrics.jsonl and TensorBoard; image grids to PNG and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
              + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._tb.flush()

  def write_image_grid(self, step: int, images: np.ndarray, final: bool = False) -> str:
    """Saves samples_<step>.png (and samples.png when final); returns the path."""
    if not self.enabled:
      return ""
    grid = image_grid(images)
    scale = max(1, 256 // images.shape[1])
    path = os.path.join(self.workdir, f"samples_{step:07d}.png")
    save_png(grid, path, scale)
    if final:
      save_png(grid, os.path.join(self.workdir, "samples.png"), scale)
    self._tb.add_image("samples", grid, int(step), dataformats="HWC")
    return path

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(workdir: str) -> str:
  """loss_curve.png: the training loss and each timestep quarter's loss against step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  path = os.path.join(workdir, "loss_curve.png")
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
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
