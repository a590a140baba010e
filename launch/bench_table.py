"""Prints the side-by-side table of a `launch/gpu_bench.sh` output folder (Markdown).

  python3 launch/bench_table.py bench_out

Rows are read from ours_*.json (diffusion_jax.tools.bench) and official_*.json
(launch/baseline_bench.py). peak GB is the device's peak, compile-time autotuning
included; step GB is what our compiled step holds (its steady state). The official step's
TFLOP/s and MFU use XLA's FLOP count of our step on the same case and batch (the same
computation), so the two are comparable.
"""
from __future__ import annotations

import glob
import json
import os
import sys


def _load(folder):
  rows = {}
  for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
    name = os.path.basename(path)[:-5]
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read().strip()
      try:
        rows[name] = json.loads(text)
      except ValueError:  # a JSON line after other output
        rows[name] = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
      print(f"(skipped {name}: not a finished result)", file=sys.stderr)
  return rows


def _fmt(v, spec=".1f"):
  return "–" if v is None else format(v, spec)


def table(folder: str) -> str:
  rows = _load(folder)
  lines = ["| case | dtype | batch | code | train img/s | ratio | compile s | "
           "sample img-steps/s | ratio | TFLOP/s | MFU | peak GB | step GB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  device = None
  for name, ours in rows.items():
    if not name.startswith("ours_"):
      continue
    device = device or ours.get("device")
    official = rows.get("official_" + name[len("ours_"):])
    _, case, dtype, batch = name.split("_")
    lines.append(
        f"| {case} | {dtype} | {batch[1:]} | diffusion_jax | {ours['train_images_per_s']:.1f} | "
        f"{_ratio(ours, official, 'train_images_per_s')} | {ours['compile_s']:.0f} | "
        f"{ours['sample_image_steps_per_s']:.0f} | "
        f"{_ratio(ours, official, 'sample_image_steps_per_s')} | "
        f"{ours['train_tflops_per_s']:.1f} | {_fmt(ours.get('mfu'), '.3f')} | "
        f"{_fmt(ours.get('peak_device_memory_gb'))} | {_fmt(ours.get('step_memory_gb'))} |")
    if official:
      tflops = ours["train_step_tflop"] * official["train_images_per_s"] / ours["batch_size"]
      mfu = ours["mfu"] * tflops / ours["train_tflops_per_s"] if ours.get("mfu") else None
      lines.append(
          f"| {case} | {dtype} | {batch[1:]} | official {official.get('torch', '')} | "
          f"{official['train_images_per_s']:.1f} | 1 | – | "
          f"{_fmt(official.get('sample_image_steps_per_s'), '.0f')} | 1 | {tflops:.1f} | "
          f"{_fmt(mfu, '.3f')} | {_fmt(official.get('peak_device_memory_gb'))} | – |")
  head = f"Device: {device or 'unknown'}. Ratios are ours ÷ official, run one after the other in one call."
  return head + "\n\n" + "\n".join(lines)


def _ratio(ours, official, key):
  if not official or not official.get(key):
    return "–"
  return f"{ours[key] / official[key]:.2f}×"


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python3 launch/bench_table.py OUT_FOLDER")
  print(table(sys.argv[1]))
