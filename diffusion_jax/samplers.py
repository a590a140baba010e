"""Samplers: DDPM, DDIM, DPM-Solver++ and UniPC, each one compiled loop.

DDPM and DDIM respace the diffusion (guided-diffusion semantics); the solvers live in
`solvers.py` and call the network at fractional timesteps.

`model_fn(x, t)` receives t on the training scale [0, T) (integers here), and returns
the network output (C or 2C channels); class labels and guidance are closed over by
the caller. Every sampler is pure and deterministic given its key; noise is drawn per
step from `fold_in(key, step)`, so results do not depend on the device count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import schedules
from diffusion_jax import solvers
from diffusion_jax.diffusion import GaussianDiffusion

SAMPLERS = ("ddpm", "ddim") + solvers.SOLVERS


def respacing_for(sampler: str, steps: int, num_timesteps: int) -> str:
  """guided-diffusion's respacing: evenly strided "ddimN" for DDIM when it exists."""
  if sampler == "ddim":
    try:
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
           steps: int = 50, clip_denoised: bool = True, eta: float = 0.0, noise=None,
           thresholding: bool = False, **solver_kw):
  """Samples of `shape` (NHWC), float32, from noise drawn with `key` (or `noise`).

  Args:
    diffusion: the training diffusion (T steps); respaced or interpolated here.
    model_fn: (x, t) -> network output, t on the training scale.
    sampler: "ddpm", "ddim", "dpm_solver++" or "unipc".
    steps: network evaluations.
    clip_denoised: clip x̂0 to [−1, 1] at every step.
    eta: DDIM's noise scale (0: deterministic).
    thresholding: dynamic thresholding of x̂0 instead of clipping.
    **solver_kw: `order`, `skip_type`, `lower_order_final` for the solvers.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}.")
  if not 1 <= steps <= diffusion.num_timesteps:
    raise ValueError(f"steps={steps} must be in [1, {diffusion.num_timesteps}].")
  init_key, loop_key = jax.random.split(key)
  x = jax.random.normal(init_key, shape, jnp.float32) if noise is None else noise
  if sampler in solvers.SOLVERS:
    return solvers.solve(diffusion, model_fn, x, sampler, steps, clip_denoised=clip_denoised,
                         thresholding=thresholding, **solver_kw)
  if solver_kw:
    raise ValueError(f"{sorted(solver_kw)} apply to the solvers, not to {sampler}.")
  spaced = diffusion.respace(respacing_for(sampler, steps, diffusion.num_timesteps))
  denoised_fn = solvers.dynamic_threshold if thresholding else None
  clip = clip_denoised and not thresholding
  n = spaced.num_timesteps

  def body(i, x):
    t = jnp.full((shape[0],), n - 1 - i, jnp.int32)
    k = jax.random.fold_in(loop_key, i)
    if sampler == "ddpm":
      return p_sample(spaced, model_fn, x, t, k, clip, denoised_fn)["sample"]
    return ddim_sample(spaced, model_fn, x, t, k, clip, denoised_fn, eta=eta)["sample"]

  return jax.lax.fori_loop(0, n, body, x)
