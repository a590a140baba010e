"""EDM's Euler and Heun samplers (Karras et al. 2022, Algorithm 2) on any trained model.

A discrete VP diffusion is the VE process x̃ = x/√ᾱ with noise level σ_t =
√((1 − ᾱ_t)/ᾱ_t), so the denoiser D(x̃, σ) = x̂0 comes from the network evaluated at
x = x̃/√(1 + σ²) and at the fractional step t(σ) where log σ, interpolated linearly
between integer steps, equals log σ (k-diffusion's DiscreteSchedule). The network's
target (ε, x0 or v) is turned into x̂0 exactly. Noise levels follow EDM's ρ = 7 spacing
from min(80, σ_{T−1}) down to σ_0, then 0; every level and step size is computed once on the host
in float64.

`steps` is EDM's N, the number of noise levels: Euler makes N network evaluations, Heun
2N − 1 (its last step, to σ = 0, is an Euler step). Stochasticity ("churn") raises σ_i to
σ̂_i = (1 + γ_i)σ_i with γ_i = min(S_churn/N, √2 − 1) for σ_i in [S_tmin, S_tmax], adding
fresh noise of std S_noise·√(σ̂_i² − σ_i²); S_churn = 0 is the deterministic ODE solver.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sampling import solvers

EDM_SAMPLERS = ("euler", "heun")
RHO = 7.0
# EDM's largest noise level: at σ = 80 the signal is 1.25% of x; a cosine schedule's
# σ_{T−1} ≈ 2·10⁴ would spend most of the ρ-spaced levels where nothing is left to see.
SIGMA_MAX = 80.0


def sigma_table(diffusion) -> np.ndarray:
  """σ_t = √((1 − ᾱ_t)/ᾱ_t) at the integer steps, float64 (T,), increasing in t."""
  abar = np.asarray(diffusion.alphas_cumprod, np.float64)
  return np.sqrt((1 - abar) / abar)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = RHO):
  """EDM's noise levels: `steps` from sigma_max down to sigma_min, uniform in σ^(1/ρ),
  then 0; float64 (steps + 1,)."""
  ramp = np.linspace(0.0, 1.0, steps)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return np.append((hi + ramp * (lo - hi)) ** rho, 0.0)


def sigma_to_t(sigmas: np.ndarray, sigma) -> np.ndarray:
  """The fractional step where log σ_t (linear between integer steps) equals log `sigma`,
  clamped to [0, T − 1]; float64 numpy, `sigma`'s shape."""
  log_sigmas = np.log(sigmas)
  log_sigma = np.log(np.asarray(sigma, np.float64))
  low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(sigmas) - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return low + w


def churn(sigmas: np.ndarray, s_churn: float, s_tmin: float, s_tmax: float) -> np.ndarray:
  """γ_i for each level but the final 0: min(S_churn/N, √2 − 1) inside [S_tmin, S_tmax]."""
  levels = sigmas[:-1]
  gamma = min(s_churn / len(levels), 2 ** 0.5 - 1)
  return np.where((levels >= s_tmin) & (levels <= s_tmax), gamma, 0.0)


def solve(diffusion, model_fn, noise, sampler: str, steps: int, key, clip_denoised=True,
          thresholding=False, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
  """Runs `sampler` ("euler" or "heun") from `noise` ~ N(0, I) (NHWC, float32 or float64:
  the arithmetic's precision) and returns x̂0 of its shape and dtype. model_fn(x, t) ->
  network output, t on the training scale. Churn noise of step i is drawn from
  fold_in(key, i)."""
  if sampler not in EDM_SAMPLERS:
    raise ValueError(f"Unknown EDM sampler {sampler!r}; choose one of {list(EDM_SAMPLERS)}.")
  table = sigma_table(diffusion)
  sigmas = karras_sigmas(table[0], min(SIGMA_MAX, table[-1]), steps)
  gammas = churn(sigmas, s_churn, s_tmin, s_tmax)
  hats = sigmas[:-1] * (1 + gammas)
  tmap = np.asarray(diffusion.timestep_map, np.float64)
  to_model_t = lambda s: solvers.interp(tmap, sigma_to_t(table, s)) if len(tmap) > 1 else 0 * s
  dtype = noise.dtype
  cast = lambda v: jnp.asarray(v, dtype)
  consts = dict(hat=cast(hats), t_hat=cast(to_model_t(hats)), next=cast(sigmas[1:]),
                t_next=cast(to_model_t(np.maximum(sigmas[1:], table[0]))),
                churn_std=cast(s_noise * np.sqrt(hats ** 2 - sigmas[:-1] ** 2)))
  channels = noise.shape[-1]

  def denoise(x, sigma, t):
    out = model_fn(x / jnp.sqrt(1 + sigma ** 2), jnp.full((x.shape[0],), t))
    out = out.astype(dtype)[..., :channels]
    if diffusion.target == "eps":
      x0 = x - sigma * out
    elif diffusion.target == "v":
      x0 = (x - sigma * jnp.sqrt(1 + sigma ** 2) * out) / (1 + sigma ** 2)
    else:
      x0 = out
    if thresholding:
      return solvers.dynamic_threshold(x0)
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

  def step(i, x, heun: bool):
    c = {k: v[i] for k, v in consts.items()}
    if s_churn > 0:
      x = x + c["churn_std"] * jax.random.normal(jax.random.fold_in(key, i), x.shape, dtype)
    d = (x - denoise(x, c["hat"], c["t_hat"])) / c["hat"]
    x_next = x + (c["next"] - c["hat"]) * d
    if not heun:
      return x_next
    d_next = (x_next - denoise(x_next, c["next"], c["t_next"])) / c["next"]
    return x + (c["next"] - c["hat"]) * 0.5 * (d + d_next)

  x = noise * cast(sigmas[0])
  x = jax.lax.fori_loop(0, steps - 1, lambda i, x: step(i, x, sampler == "heun"), x)
  return step(steps - 1, x, heun=False)  # to σ = 0: an Euler step, x̂0 itself
