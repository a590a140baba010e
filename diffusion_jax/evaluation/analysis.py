"""The paper's bias analyses: the numbers, and a PNG plot + JSON table for each.

1. x0-estimation error per timestep bucket on held-out data (`x0_error_by_timestep`);
2. colour shift at few sampling steps: per-channel mean/std of samples against the data
   (`colour_statistics`), drawn as a Figure-1-style strip (`plot_colour_strip`);
3. FID against the number of sampling steps, per sampler (`plot_fid_vs_steps`);
4. FID against training step (`plot_fid_vs_train_step`).

Sampling and Inception features are done by the caller (`diffusion_jax.evaluate`); this
module computes and draws. Images are NHWC; uint8 unless stated.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import models
from diffusion_jax import paths
from diffusion_jax import reporting


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


def write_json(obj, path) -> str:
  text = json.dumps(obj, indent=1, default=lambda o: np.asarray(o).tolist())
  return os.fspath(paths.write_text(path, text))


# --- 1. x0 error per timestep ---------------------------------------------------------

def timestep_buckets(num_timesteps: int, buckets: int) -> np.ndarray:
  """(buckets + 1,) integer edges splitting [0, T) into equal ranges."""
  if not 1 <= buckets <= num_timesteps:
    raise ValueError(f"x0_buckets={buckets} must be in [1, {num_timesteps}].")
  return np.linspace(0, num_timesteps, buckets + 1).round().astype(int)


def x0_error_by_timestep(model, diffusion, params, images, key, buckets: int = 10,
                         batch_size: int = 256, labels=None) -> dict:
  """Mean squared error of x̂0 (and of ε̂) per timestep bucket, over `images`.

  Args:
    images: (N, H, W, C) float32 held-out data in [−1, 1].
    key: every (example, bucket) pair draws t uniformly within the bucket and fresh
      noise from it; the same key gives every model the same t and noise.
    labels: (N,) int32 class labels for class-conditional models.

  Returns {"t_lo", "t_hi", "x0_mse", "eps_mse": per-bucket lists, "n": N}; errors are
  per-pixel means over [−1, 1] images (x̂0 unclipped: the network's own estimate).
  """
  images = np.asarray(images, np.float32)
  edges = timestep_buckets(diffusion.num_timesteps, buckets)

  @jax.jit
  def errors(p, x0, y, k):
    def one_bucket(lo_hi, kb):
      lo, hi = lo_hi
      kt, kn = jax.random.split(kb)
      t = jax.random.randint(kt, (x0.shape[0],), lo, hi)
      noise = jax.random.normal(kn, x0.shape, jnp.float32)
      x_t = diffusion.q_sample(x0, t, noise)
      out = models.bind(model, p, y)(x_t, diffusion.model_timesteps(t))
      mean_part, _ = diffusion.split_model_output(out, x_t)
      x0_hat = diffusion.predict_xstart(x_t, t, mean_part)
      eps_hat = diffusion.predict_eps_from_xstart(x_t, t, x0_hat)
      axes = tuple(range(1, x0.ndim))
      return (jnp.sum(jnp.mean((x0_hat - x0) ** 2, axes)),
              jnp.sum(jnp.mean((eps_hat - noise) ** 2, axes)))
    keys = jax.random.split(k, buckets)
    return jax.lax.map(lambda a: one_bucket((a[0], a[1]), a[2]),
                       (jnp.asarray(edges[:-1]), jnp.asarray(edges[1:]), keys))

  x0_sum, eps_sum = np.zeros(buckets), np.zeros(buckets)
  for b, start in enumerate(range(0, len(images), batch_size)):
    x0 = images[start:start + batch_size]
    y = None if labels is None else jnp.asarray(labels[start:start + batch_size])
    e_x0, e_eps = errors(params, jnp.asarray(x0), y, jax.random.fold_in(key, b))
    x0_sum += np.asarray(e_x0, np.float64)
    eps_sum += np.asarray(e_eps, np.float64)
  n = len(images)
  return {"t_lo": edges[:-1].tolist(), "t_hi": (edges[1:] - 1).tolist(),
          "x0_mse": (x0_sum / n).tolist(), "eps_mse": (eps_sum / n).tolist(), "n": n}


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
  from diffusion_jax.objective import weighting as weighting_lib  # pylint: disable=import-outside-toplevel
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


# --- 2. colour shift -------------------------------------------------------------------

def colour_statistics(images) -> dict:
  """Per-channel mean and std of uint8 images, in the model's [−1, 1] units."""
  x = np.asarray(images, np.float64) / 127.5 - 1
  return {"mean": x.mean(axis=(0, 1, 2)).tolist(), "std": x.std(axis=(0, 1, 2)).tolist(),
          "n": len(x)}


def colour_shift(samples_by_steps: dict[int, np.ndarray], data_images) -> dict:
  """For each step count: the samples' channel stats, their gap to the data's, and
  `mean_shift` = ‖mean − data mean‖₂ over channels, `std_ratio` = mean(std / data std)."""
  data = colour_statistics(data_images)
  table = {"data": data, "steps": {}}
  for steps, images in sorted(samples_by_steps.items()):
    s = colour_statistics(images)
    s["mean_shift"] = float(np.linalg.norm(np.subtract(s["mean"], data["mean"])))
    s["std_ratio"] = float(np.mean(np.divide(s["std"], data["std"])))
    table["steps"][int(steps)] = s
  return table


def static_fraction(images, threshold: float = 0.3) -> float:
  """Fraction of uint8 images (N, H, W, C) that are mostly static: the mean absolute
  difference of vertically neighbouring pixels, in [−1, 1] units, exceeds `threshold`
  (real Fashion-MNIST images stay far below 0.3; uniform static is about 0.67)."""
  x = np.asarray(images, np.float32) / 127.5 - 1
  roughness = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3))
  return float(np.mean(roughness > threshold))


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


# --- 3. and 4. FID curves --------------------------------------------------------------

def plot_fid_vs_steps(results: dict[str, dict[str, dict[int, dict]]], path: str,
                      model: str = "") -> str:
  """results[label][sampler][steps] = metrics dict (with "fid", "n_samples", optional
  "sfid"). FID and sFID on separate axes; a series of at most 3 points is drawn as
  labelled markers (a line through so few points suggests a trend it cannot show).
  The title names `model` (e.g. "adm_unet, fashion_mnist 32 px, step 2400"), the
  samplers and the sample count."""
  plt = _pyplot()
  has_sfid = any("sfid" in m for r in results.values() for s in r.values() for m in s.values())
  metrics = ("fid", "sfid") if has_sfid else ("fid",)
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
  counts, samplers, all_steps = set(), set(), set()
  for label, per_sampler in results.items():
    for sampler, per_steps in per_sampler.items():
      steps = sorted(per_steps)
      all_steps.update(steps)
      samplers.add(sampler)
      counts.update(per_steps[s]["n_samples"] for s in steps)
      for ax, key in zip(axes[0], metrics):
        values = [per_steps[s][key] for s in steps]
        few = len(steps) <= 3
        line, = ax.plot(steps, values, marker="o", linestyle="none" if few else "-",
                        label=f"{label} ({sampler})")
        if few:
          for s, v in zip(steps, values):
            ax.annotate(f"{v:.1f}", (s, v), textcoords="offset points", xytext=(6, 4),
                        fontsize=8, color=line.get_color())
  for ax, key in zip(axes[0], metrics):
    _step_ticks(ax, sorted(all_steps))
    ax.set(xlabel="sampling steps", ylabel=key.upper().replace("SFID", "sFID"))
    ax.margins(x=0.12, y=0.15)  # room for the value labels at the edges
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  n = "/".join(str(c) for c in sorted(counts))
  fig.suptitle(f"{model + ': ' if model else ''}{', '.join(sorted(samplers))}, "
               f"{n} samples per point", fontsize=10)
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


def gradient_variance(model, objective, params, images, key, labels=None,
                      draws: int = 16) -> dict:
  """How noisy the training gradient is on one fixed batch.

  Draws t (with the objective's importance weights) and ε `draws` times for the same
  `images` (B, H, W, C) float32 in [−1, 1] and returns {"trace_var": the total variance
  E‖g − ḡ‖² of the batch gradient g over those draws, "mean_norm": ‖ḡ‖, "draws"}.
  The objective starts from its initial state (uniform for loss-second-moment).
  """
  import jax.flatten_util  # pylint: disable=import-outside-toplevel
  state = objective.init(key)

  @jax.jit
  def grad(k):
    k_t, k_n = jax.random.split(k)
    t, weights = objective.sample_t(state, k_t, images.shape[0])
    noise = jax.random.normal(k_n, images.shape, jnp.float32)

    def loss(p):
      return objective.loss(models.bind(model, p, labels), objective.trainable(state), state,
                            images, t, weights, noise)[0]

    return jax.flatten_util.ravel_pytree(jax.grad(loss)(params))[0]

  grads = np.stack([np.asarray(grad(jax.random.fold_in(key, i)), np.float64)
                    for i in range(draws)])
  mean = grads.mean(0)
  return {"trace_var": float(np.mean(np.sum((grads - mean) ** 2, axis=1))),
          "mean_norm": float(np.linalg.norm(mean)), "draws": draws}
