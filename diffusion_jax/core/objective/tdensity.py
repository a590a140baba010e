"""Timestep densities for training: which t each example gets, and its importance weight.

  uniform             t ~ U{0..T−1}.
  loss-second-moment  guided-diffusion's adaptive sampler, p(t) ∝ √E[L_t²].
  importance          p(t) ∝ the configured loss weight w(t) (after max_weight).
  logit_normal        p(t) ∝ logit-normal(loc, scale) density at (t+½)/T (SD3).
  laplace_logsnr      p(t) = the mass of Laplace(mu, b) on log-SNR over t's bin (Hang et al.).

Each draw comes with the weight 1/(T·p(t)), so E_p[weight · w(t)·L_t] equals the uniform-t
objective (1/T)·Σ_t w(t)·L_t exactly: the sampler changes the gradient's variance, not
its expectation. With `density_is_weight` (SD3's convention; the fixed densities only)
the weight is 1 and the density itself becomes part of the weighting: the objective is
Σ_t p(t)·w(t)·L_t. Under `importance` every example's factor w(t)/(T·p(t)) is the same
constant, mean_t w(t).

Each density is pure: its state is a small pytree kept in the objective's state (and
so in checkpoints), `sample` draws t with importance weights, `update` folds in the
losses of a step. Every kind shares one state layout, so switching density never
changes the checkpoint's structure. The config names it `diffusion.timestep_sampler`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

FIXED_DENSITIES = ("importance", "logit_normal", "laplace_logsnr")
DENSITY_NAMES = ("uniform", "loss-second-moment") + FIXED_DENSITIES
DENSITY_DEFAULTS = {"loc": 0.0, "scale": 1.0, "mu": 0.0, "b": 0.5}


def fixed_density(name: str, loss_weight, log_snr, loc: float = 0.0, scale: float = 1.0,
                  mu: float = 0.0, b: float = 0.5) -> np.ndarray:
  """p(t) (T,) float64 of a fixed-density sampler, from the diffusion's per-step
  loss_weight and log_snr tables (each (T,))."""
  loss_weight, log_snr = np.asarray(loss_weight, np.float64), np.asarray(log_snr, np.float64)
  n = len(log_snr)
  for field, value in (("loc", loc), ("scale", scale), ("mu", mu), ("b", b)):
    if not np.isfinite(value):
      raise ValueError(f"timestep_sampler_params.{field}={value}: must be finite.")
  if name == "importance":
    if np.any(loss_weight < 0) or not np.any(loss_weight > 0):
      raise ValueError("timestep_sampler='importance' needs loss weights ≥ 0 with a "
                       "positive one.")
    p = loss_weight
  elif name == "logit_normal":
    if not scale > 0:
      raise ValueError(f"timestep_sampler_params.scale={scale}: must be > 0.")
    u = (np.arange(n) + 0.5) / n
    p = np.exp(-0.5 * ((scipy.special.logit(u) - loc) / scale) ** 2) / (u * (1 - u))
  elif name == "laplace_logsnr":
    if not b > 0:
      raise ValueError(f"timestep_sampler_params.b={b}: must be > 0.")
    # log-SNR falls with t; bin t spans the midpoints to its neighbours (±∞ at the ends).
    edges = np.concatenate([[np.inf], (log_snr[1:] + log_snr[:-1]) / 2, [-np.inf]])
    cdf = lambda lam: np.where(lam < mu, 0.5 * np.exp((lam - mu) / b),
                               1 - 0.5 * np.exp(-(lam - mu) / b))
    p = cdf(edges[:-1]) - cdf(edges[1:])
  else:
    raise ValueError(f"{name!r} is not a fixed-density sampler; choose one of "
                     f"{list(FIXED_DENSITIES)}.")
  total = p.sum()
  if not (np.all(np.isfinite(p)) and np.all(p >= 0) and np.isfinite(total) and total > 0):
    raise ValueError(
        f"diffusion.timestep_sampler={name!r} with timestep_sampler_params loc={loc}, "
        f"scale={scale}, mu={mu}, b={b} gives no "
        f"usable density over the {n} steps (it underflows to zero or is not finite). "
        + _DENSITY_RANGES[name])
  return p / total


_DENSITY_RANGES = {
    "importance": "Use a weighting whose weights are ≥ 0 with a positive one.",
    "logit_normal": "Keep loc within about ±5 (the logits of the steps span ±7.6 at "
                    "T=1000) and scale between 0.1 and 10; SD3 uses loc=0, scale=1.",
    "laplace_logsnr": "Keep mu within the schedule's log-SNR range (about −10 to +10 for "
                      "the linear schedule) and b between 0.1 and 10; Hang et al. use "
                      "mu=0, b=0.5.",
}


@dataclasses.dataclass(frozen=True)
class TimestepDensity:
  """Draws training timesteps t ∈ [0, T) with importance weights 1/(T·p(t)).

  `loss-second-moment` (Nichol & Dhariwal) samples t ∝ √E[L_t²] over the last
  `history_per_term` losses of each t, mixed with `uniform_prob` of the uniform, once
  every t has a full history; until then it samples uniformly.
  """
  name: str
  num_timesteps: int
  history_per_term: int = 10
  uniform_prob: float = 0.001
  density: tuple | None = None  # p(t) of the fixed-density samplers (see fixed_density)
  density_is_weight: bool = False

  def __post_init__(self):
    if self.name not in DENSITY_NAMES:
      raise ValueError(f"Unknown timestep sampler {self.name!r}; choose one of "
                       f"{list(DENSITY_NAMES)}.")
    if (self.name in FIXED_DENSITIES) != (self.density is not None):
      raise ValueError(f"timestep sampler {self.name!r}: build it with "
                       "TimestepDensity.for_tables, which computes its density.")
    if self.density_is_weight and self.name not in ("logit_normal", "laplace_logsnr"):
      raise ValueError("weighting_params.density_is_weight applies to the logit_normal and "
                       f"laplace_logsnr samplers, not to {self.name!r}.")

  @classmethod
  def for_tables(cls, name: str, loss_weight, log_snr, density_is_weight: bool = False,
                 **density_params) -> "TimestepDensity":
    """The density `name` over the steps of the (T,) loss_weight and log_snr tables
    (which define the fixed densities); density_params: loc, scale (logit_normal), mu, b
    (laplace_logsnr)."""
    density = None
    if name in FIXED_DENSITIES:
      density = tuple(float(v) for v in fixed_density(name, loss_weight, log_snr,
                                                      **density_params))
    return cls(name, len(log_snr), density=density, density_is_weight=density_is_weight)

  def init(self) -> dict:
    return {"loss_history": jnp.zeros((self.num_timesteps, self.history_per_term),
                                      jnp.float32),
            "loss_counts": jnp.zeros((self.num_timesteps,), jnp.int32)}

  def probabilities(self, state: dict) -> jax.Array:
    """p(t), shape (T,)."""
    uniform = jnp.full((self.num_timesteps,), 1.0 / self.num_timesteps)
    if self.name == "uniform":
      return uniform
    if self.density is not None:
      return jnp.asarray(self.density, jnp.float32)
    warmed_up = jnp.all(state["loss_counts"] == self.history_per_term)
    w = jnp.sqrt(jnp.mean(state["loss_history"] ** 2, axis=-1))
    w = w / jnp.sum(w)
    w = w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
    return jnp.where(warmed_up, w, uniform)

  def sample(self, state: dict, key: jax.Array, batch_size: int):
    """(t (B,) int32, weights (B,) float32) with E[weight·L_t] = the uniform mean."""
    p = self.probabilities(state)
    if self.name == "uniform":
      t = jax.random.randint(key, (batch_size,), 0, self.num_timesteps, dtype=jnp.int32)
    else:
      t = jax.random.choice(key, self.num_timesteps, (batch_size,), p=p).astype(jnp.int32)
    if self.density_is_weight:
      return t, jnp.ones((batch_size,), jnp.float32)
    return t, (1.0 / (self.num_timesteps * p[t])).astype(jnp.float32)

  def update(self, state: dict, t: jax.Array, losses: jax.Array) -> dict:
    """Appends each (t_i, loss_i) in order, dropping the oldest when a history is full."""
    if self.name != "loss-second-moment":
      return state

    def add(st, tl):
      ti, li = tl
      hist, counts = st["loss_history"], st["loss_counts"]
      full = counts[ti] == self.history_per_term
      shifted = jnp.concatenate([hist[ti, 1:], li[None]])
      appended = hist[ti].at[jnp.minimum(counts[ti], self.history_per_term - 1)].set(li)
      hist = hist.at[ti].set(jnp.where(full, shifted, appended))
      counts = counts.at[ti].set(jnp.minimum(counts[ti] + 1, self.history_per_term))
      return {"loss_history": hist, "loss_counts": counts}, None

    state, _ = jax.lax.scan(add, state, (t, losses.astype(jnp.float32)))
    return state
