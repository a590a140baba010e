"""The evaluation's figures: one function per plot, each taking an analysis's numbers
(as its report section holds them) and a path, and returning the PNG's path.

Only this module imports matplotlib (Agg, headless).
"""
from __future__ import annotations

import numpy as np

from diffusion_jax import paths
from diffusion_jax import reporting
from diffusion_jax.core.objective import weighting as weighting_lib


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path, dpi: int = 100) -> str:
  plt = _pyplot()
  fig.tight_layout()
  path = paths.save_figure(fig, path, dpi=dpi)
  plt.close(fig)
  return path


def plot_x0_error(results: dict[str, dict], path: str) -> str:
  """One line per label: x̂0 MSE (log scale) and ε̂ MSE against the bucket's centre t."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  n = None
  for label, r in results.items():
    centre = (np.asarray(r["t_lo"]) + np.asarray(r["t_hi"])) / 2
    axes[0].plot(centre, r["x0_mse"], marker="o", label=label)
    axes[1].plot(centre, r["eps_mse"], marker="o", label=label)
    n = r["n"]
  axes[0].set(xlabel="timestep t", ylabel="‖x̂0 − x0‖² per pixel", yscale="log",
              title=f"x0 estimation error (held-out, n={n} per bucket)")
  axes[1].set(xlabel="timestep t", ylabel="‖ε̂ − ε‖² per pixel",
              title="ε estimation error (same draws)")
  for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_weight_curves(learned: dict[str, dict], diffusion, path: str) -> str:
  """Each stateful weighting's effective weight (e.g. w₀/exp(u)) against t, beside the
  fixed debias, min_snr and p2 weights; every curve scaled to mean 1 over t (log scale)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  snr = np.asarray(diffusion.snr)
  t = np.arange(len(snr))
  for name in ("debias", "min_snr", "p2"):
    w = np.asarray(weighting_lib.epsilon_weight(name, snr), np.float64)
    ax.plot(t, w / w.mean(), linestyle="--", label=name)
  for label, curve in learned.items():
    w = np.asarray(curve["effective"], np.float64)
    ax.plot(t, w / w.mean(), linewidth=2.5,
            label=f"{label} (w₀={curve['base_name']})")
  ax.set(xlabel="timestep t", ylabel="ε-MSE weight / its mean over t", yscale="log",
         title="Stateful weightings' effective weight against fixed weightings")
  ax.legend()
  ax.grid(alpha=0.3)
  return _save(fig, path)


def _step_ticks(ax, steps) -> None:
  """Log-scaled x axis labelled with the step counts themselves."""
  ax.set_xscale("log")
  ax.set_xticks(list(steps))
  ax.set_xticklabels([str(s) for s in steps])
  ax.minorticks_off()


def plot_colour_strip(rows: dict[str, dict[int, np.ndarray]], path: str,
                      per_cell: int = 4) -> str:
  """Figure-1-style strip: one row per label, one column per step count; each cell
  holds the first `per_cell` samples (same starting noise in every cell)."""
  plt = _pyplot()
  labels = list(rows)
  steps = sorted(next(iter(rows.values())))
  fig, axes = plt.subplots(len(labels), len(steps), squeeze=False,
                           figsize=(1.6 * len(steps), 1.8 * len(labels) + 0.4))
  for i, label in enumerate(labels):
    for j, s in enumerate(steps):
      cell = reporting.image_grid(rows[label][s][:per_cell], pad=1)
      ax = axes[i, j]
      ax.imshow(cell[..., 0] if cell.shape[-1] == 1 else cell,
                cmap="gray" if cell.shape[-1] == 1 else None, vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(f"{s} steps", fontsize=9)
      if j == 0:
        ax.set_ylabel(label, fontsize=9)
  return _save(fig, path, 110)


def plot_colour_stats(tables: dict[str, dict], path: str) -> str:
  """Per-channel sample mean and std against sampling steps, data values dashed."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  names = ("R", "G", "B")
  styles = ("-", "--", ":", "-.")
  for li, (label, table) in enumerate(tables.items()):
    steps = sorted(table["steps"])
    channels = len(table["data"]["mean"])
    for c in range(channels):
      cname = names[c] if channels == 3 else "grey"
      colour = ("tab:red", "tab:green", "tab:blue")[c] if channels == 3 else "k"
      for ax, key in zip(axes, ("mean", "std")):
        ax.plot(steps, [table["steps"][s][key][c] for s in steps], styles[li % 4],
                color=colour, marker="o", ms=3, label=f"{label} {cname}")
        if li == 0:
          ax.axhline(table["data"][key][c], color=colour, lw=0.8, alpha=0.5)
  n = next(iter(tables.values()))
  n_samples = next(iter(n["steps"].values()))["n"]
  for ax, key in zip(axes, ("mean", "std")):
    _step_ticks(ax, steps)
    ax.set(xlabel="sampling steps", ylabel=f"channel {key} ([−1, 1] units)",
           title=f"Sample {key} per channel (n={n_samples}; thin lines: data, "
                 f"n={n['data']['n']})")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, ncol=2)
  return _save(fig, path)


def plot_fid_vs_steps(results: dict[str, dict[str, dict[int, dict]]], path: str,
                      model: str = "") -> str:
  """results[label][sampler][steps] = metrics dict (with "fid", "n_samples", optional
  "sfid"), on a log axis of steps. The title names `model` (e.g. "adm_unet,
  fashion_mnist 32 px, step 2400"), the samplers and the sample count."""
  series = {f"{label} ({sampler})": per_steps for label, per_sampler in results.items()
            for sampler, per_steps in per_sampler.items()}
  samplers = sorted({sampler for r in results.values() for sampler in r})
  return plot_fid_against(series, path, "sampling steps",
                          f"{model + ': ' if model else ''}{', '.join(samplers)}",
                          log_steps=True)


def plot_fid_against(series: dict[str, dict[float, dict]], path: str, xlabel: str,
                     title: str, log_steps: bool = False) -> str:
  """series[legend][x] = metrics dict (with "fid", "n_samples", optional "sfid"): FID and
  sFID against x on separate axes. A series of at most 3 points is drawn as labelled
  markers (a line through so few points suggests a trend it cannot show). The title
  gets the sample count appended."""
  plt = _pyplot()
  has_sfid = any("sfid" in m for per_x in series.values() for m in per_x.values())
  metrics = ("fid", "sfid") if has_sfid else ("fid",)
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
  counts, all_x = set(), set()
  for legend, per_x in series.items():
    xs = sorted(per_x)
    all_x.update(xs)
    counts.update(per_x[x]["n_samples"] for x in xs)
    for ax, key in zip(axes[0], metrics):
      values = [per_x[x][key] for x in xs]
      few = len(xs) <= 3
      line, = ax.plot(xs, values, marker="o", linestyle="none" if few else "-", label=legend)
      if few:
        for x, v in zip(xs, values):
          ax.annotate(f"{v:.1f}", (x, v), textcoords="offset points", xytext=(6, 4),
                      fontsize=8, color=line.get_color())
  for ax, key in zip(axes[0], metrics):
    if log_steps:
      _step_ticks(ax, sorted(all_x))
    ax.set(xlabel=xlabel, ylabel=key.upper().replace("SFID", "sFID"))
    ax.margins(x=0.12, y=0.15)  # room for the value labels at the edges
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  n = "/".join(str(c) for c in sorted(counts))
  fig.suptitle(f"{title}, {n} samples per point", fontsize=10)
  return _save(fig, path)


def plot_fid_vs_train_step(results: dict[str, dict[int, dict]], path: str,
                           subtitle: str = "") -> str:
  """results[label][train_step] = metrics dict: FID against training step."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  n = None
  for label, per_step in results.items():
    steps = sorted(per_step)
    n = per_step[steps[0]]["n_samples"]
    ax.plot(steps, [per_step[s]["fid"] for s in steps], marker="o", label=label)
  ax.set(xlabel="training step", ylabel="FID",
         title=f"FID against training step ({n} samples{', ' + subtitle if subtitle else ''})")
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)
