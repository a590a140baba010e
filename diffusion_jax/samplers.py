"""Samplers: DDPM ancestral and DDIM, each one compiled loop over respaced steps.

`model_fn(x, t)` receives t on the training scale [0, T) (integers here), and returns
the network output (C or 2C channels); class labels and guidance are closed over by
the caller. Every sampler is pure and deterministic given its key; noise is drawn per
step from `fold_in(key, step)`, so results do not depend on the device count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import GaussianDiffusion

SAMPLERS = ("ddpm", "ddim")


def respacing_for(sampler: str, steps: int, num_timesteps: int) -> str:
  """guided-diffusion's respacing: evenly strided "ddimN" for DDIM when it exists."""
  if sampler == "ddim":
    try:
      from diffusion_jax import schedules  # pylint: disable=import-outside-toplevel
      schedules.space_timesteps(num_timesteps, f"ddim{steps}")
      return f"ddim{steps}"
    except ValueError:
      pass
  return str(steps)


def p_sample(diffusion: GaussianDiffusion, model_fn, x, t, key, clip_denoised=True,
             denoised_fn=None):
  """One ancestral step x_t -> x_{t−1} (guided-diffusion's p_sample)."""
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn)
  noise = jax.random.normal(key, x.shape, x.dtype)
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return {"sample": out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise,
          "pred_xstart": out["pred_xstart"]}


def ddim_sample(diffusion: GaussianDiffusion, model_fn, x, t, key, clip_denoised=True,
                denoised_fn=None, eta: float = 0.0):
  """One DDIM step (Song et al. eq. 12; guided-diffusion's ddim_sample)."""
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn)
  eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
  abar = diffusion._at("alphas_cumprod", t, x)  # pylint: disable=protected-access
  abar_prev = diffusion._at("alphas_cumprod_prev", t, x)  # pylint: disable=protected-access
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
  mean = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
  noise = jax.random.normal(key, x.shape, x.dtype)
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}


def sample(diffusion: GaussianDiffusion, model_fn, shape, key, sampler: str = "ddim",
           steps: int = 50, clip_denoised: bool = True, eta: float = 0.0, noise=None):
  """Samples of `shape` (NHWC) in [−1, 1] (clipped only through x̂0), float32.

  `diffusion` is the training diffusion; it is respaced to `steps` here.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}.")
  if not 1 <= steps <= diffusion.num_timesteps:
    raise ValueError(f"steps={steps} must be in [1, {diffusion.num_timesteps}].")
  spaced = diffusion.respace(respacing_for(sampler, steps, diffusion.num_timesteps))
  init_key, loop_key = jax.random.split(key)
  x = jax.random.normal(init_key, shape, jnp.float32) if noise is None else noise
  n = spaced.num_timesteps

  def body(i, x):
    t = jnp.full((shape[0],), n - 1 - i, jnp.int32)
    k = jax.random.fold_in(loop_key, i)
    if sampler == "ddpm":
      return p_sample(spaced, model_fn, x, t, k, clip_denoised)["sample"]
    return ddim_sample(spaced, model_fn, x, t, k, clip_denoised, eta=eta)["sample"]

  return jax.lax.fori_loop(0, n, body, x)
