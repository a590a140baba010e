"""Noise schedules and every per-step array derived from them.

Everything here is float64 numpy, computed once on the host with guided-diffusion's
semantics; callers cast to float32 when they place arrays on a device. Index `t`
runs over 0..T-1, where t=0 is the first (least noisy) diffusion step.
"""
from __future__ import annotations

import math
from typing import Callable
from typing import Sequence

import numpy as np

SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
  """Discretises a continuous ᾱ(s), s in [0, 1], into `num_timesteps` betas, each capped."""
  s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  abar = np.array([alpha_bar(x) for x in s], dtype=np.float64)
  return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """Betas (T,) float64 for a named schedule.

  `linear` is Ho et al.'s 1e-4..0.02 scaled by 1000/T so that any T gives a similar
  process; `cosine` is Nichol & Dhariwal's with offset 0.008 and betas capped at 0.999.
  """
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}.")
  if name == "linear":
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == "cosine":
    return betas_for_alpha_bar(
        num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
  raise ValueError(f"Unknown beta schedule {name!r}; choose one of {list(SCHEDULES)}.")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
  """The original steps to keep when respacing a T-step process (guided-diffusion rules).

  `section_counts` is "" (keep all), "ddimN" (N evenly strided steps, the stride found
  by search so that exactly N remain), a comma-separated string or a list of counts:
  the T steps are cut into that many near-equal sections and each section keeps its
  count of steps, evenly spaced with rounding, first and last included.
  """
  if isinstance(section_counts, str):
    if section_counts == "":
      return set(range(num_timesteps))
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return set(range(0, num_timesteps, stride))
      raise ValueError(f"Cannot take exactly {desired} evenly strided steps from "
                       f"{num_timesteps}; choose another ddim count.")
    try:
      section_counts = [int(x) for x in section_counts.split(",")]
    except ValueError:
      raise ValueError(f"Bad timestep respacing {section_counts!r}: use '', 'ddimN' or "
                       "comma-separated integers such as '10,20'.") from None
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start = 0
  kept = []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if count > size:
      raise ValueError(f"Cannot divide a section of {size} steps into {count}.")
    frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.append(start + round(cur))
      cur += frac_stride
    start += size
  return set(kept)


def respace_betas(betas: np.ndarray, use_timesteps) -> tuple[np.ndarray, np.ndarray]:
  """Betas of the process that visits only `use_timesteps`, and the map back.

  Returns (new_betas (K,) float64, timestep_map (K,) int64): new step k stands for the
  original step timestep_map[k], and the new ᾱ equal the originals at the kept steps.
  """
  keep = sorted(int(t) for t in use_timesteps)
  abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
  new_betas, last = [], 1.0
  for t in keep:
    new_betas.append(1.0 - abar[t] / last)
    last = abar[t]
  return np.array(new_betas, dtype=np.float64), np.array(keep, dtype=np.int64)


def derived_arrays(betas: np.ndarray) -> dict[str, np.ndarray]:
  """Every per-step array of a beta schedule, keyed by guided-diffusion's names.

  All (T,) float64. `snr` = ᾱ/(1−ᾱ) and `log_snr` its log. The posterior log-variance is
  clipped at t=0 (where the posterior variance is 0) to the value at t=1.
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
    raise ValueError("betas must be a 1-D array with every value in (0, 1].")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  snr = abar / (1.0 - abar)
  return {
      "betas": betas,
      "alphas_cumprod": abar,
      "alphas_cumprod_prev": abar_prev,
      "alphas_cumprod_next": np.append(abar[1:], 0.0),
      "sqrt_alphas_cumprod": np.sqrt(abar),
      "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
      "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
      "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
      "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
      "posterior_variance": posterior_variance,
      "posterior_log_variance_clipped": np.log(
          np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1
          else betas),
      "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
      "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
      "log_betas": np.log(betas),
      "snr": snr,
      "log_snr": np.log(abar) - np.log1p(-abar),
  }
