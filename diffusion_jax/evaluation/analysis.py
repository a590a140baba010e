"""The paper's bias analyses as numbers (their figures are in `plots`).

x0-estimation error per timestep bucket on held-out data (`x0_error_by_timestep`);
colour shift at few sampling steps: per-channel mean/std of samples against the data
(`colour_statistics`, `colour_shift`); the fraction of static samples; the gradient's
variance under a timestep density (`gradient_variance`).

Sampling and Inception features are done by the caller (`evaluation.evaluate`).
Images are NHWC; uint8 unless stated.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import models
from diffusion_jax import paths


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


# --- 3. and 4. FID curves --------------------------------------------------------------

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
