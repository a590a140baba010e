"""Gaussian diffusion: forward process, posterior, model mean/variance, losses, VLB.

A pure-functional port of guided-diffusion's `GaussianDiffusion` (names kept so the two
can be read side by side), extended with x0/v targets. The loss weighting lives in `objective`.

Shapes: images are NHWC float arrays in [−1, 1]; `t` is an int array of shape (B,)
indexing the diffusion's own steps 0..T−1. `model_fn(x_t, t_model)` returns the
network output: C channels, or 2C with a learned variance (mean part first). For a
respaced diffusion `t_model = timestep_map[t]`, the original step the network was
trained on. Per-step tables are kept in float64 and cast at use to the images'
precision (float32 at least), exactly as guided-diffusion casts them; with float64
images under `jax.enable_x64` the whole computation runs in float64.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import schedules

TARGETS = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_choice(kind: str, value: str, choices) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {kind} {value!r}; choose one of {list(choices)}.")


def check_settings(target: str, var_type: str, loss_type: str) -> None:
  """ValueError naming an unknown prediction target, variance type or loss type."""
  _check_choice("prediction target", target, TARGETS)
  _check_choice("variance type", var_type, VAR_TYPES)
  _check_choice("loss type", loss_type, LOSS_TYPES)


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: (B, ...) -> (B,)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _log_approx_cdf(x):
  """log Φ̃(x) for the tanh approximation, computed as log σ(2u(x)) without cancellation."""
  u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
  return jax.nn.log_sigmoid(2.0 * u)


def _log1mexp(z):
  """log(1 − e^z) for z ≤ 0, accurate at both ends (Mächler 2012)."""
  return jnp.where(z > -math.log(2.0), jnp.log(-jnp.expm1(z)), jnp.log1p(-jnp.exp(z)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) of 8-bit data x in [−1, 1] under a Gaussian discretised to 256 bins, in nats.

  The two outer bins extend to ±∞. Elementwise; all arguments broadcast to x's shape.
  guided-diffusion's arithmetic (the tanh approximation Φ̃ of the normal CDF, each
  probability floored at 1e-12), evaluated stably: Φ̃(x) = σ(2u(x)) with u odd, so the
  upper tail is 1 − Φ̃(x) = Φ̃(−x), and a bin's mass Φ̃(b) − Φ̃(a) is taken on the side
  where both ends are in the lower tail, as log Φ̃(b) + log(1 − Φ̃(a)/Φ̃(b)). The direct
  difference of two CDF values near 1 loses every digit in float32 (guided-diffusion's
  float32 code keeps ~1e-3; this stays within 1e-5 of float64).
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  plus = inv_stdv * (centered + 1.0 / 255.0)
  minus = inv_stdv * (centered - 1.0 / 255.0)
  floor = math.log(1e-12)
  log_cdf_plus = jnp.maximum(_log_approx_cdf(plus), floor)
  log_one_minus_cdf_min = jnp.maximum(_log_approx_cdf(-minus), floor)
  flip = plus + minus > 0  # both ends in the upper tail: mirror the bin
  hi = jnp.where(flip, -minus, plus)
  lo = jnp.where(flip, -plus, minus)
  log_hi, log_lo = _log_approx_cdf(hi), _log_approx_cdf(lo)
  log_cdf_delta = jnp.maximum(log_hi + _log1mexp(jnp.minimum(log_lo - log_hi, 0.0)), floor)
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """table[t] shaped (B, 1, ..., 1) with `ndim` axes, to broadcast against images."""
  return table[t].reshape((t.shape[0],) + (1,) * (ndim - 1))


def _compute_dtype(x) -> jnp.dtype:
  """float32, or float64 for float64 inputs (bf16 images still compute in float32)."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


@jax.tree_util.register_pytree_node_class
class GaussianDiffusion:
  """An immutable diffusion process; every method is pure and jit/vmap-safe.

  Args:
    betas: (T,) noise schedule (see `schedules.get_named_beta_schedule`).
    target: what the network predicts: "eps", "x0" or "v".
    var_type: "fixed_small" (posterior variance), "fixed_large" (betas) or
      "learned_range" (the network's extra C channels interpolate between the two in
      log space, as in Nichol & Dhariwal).
    loss_type: "mse", "rescaled_mse" (the hybrid loss: weighted MSE plus the VLB on
      the variance, scaled by T/1000), "kl" or "rescaled_kl".
    timestep_map: (T,) original step of each step, for a respaced process.
  """

  def __init__(self, betas, *, target: str = "eps", var_type: str = "fixed_small",
               loss_type: str = "mse", timestep_map=None):
    check_settings(target, var_type, loss_type)
    tables = schedules.derived_arrays(betas)
    n = len(tables["betas"])
    # guided-diffusion's fixed_large uses the posterior variance at t=0 for a better
    # decoder likelihood.
    tables["fixed_large_variance"] = np.append(tables["posterior_variance"][1],
                                               tables["betas"][1:])
    tables["fixed_large_log_variance"] = np.log(tables["fixed_large_variance"])
    if timestep_map is None:
      timestep_map = np.arange(n)
    timestep_map = np.asarray(timestep_map, dtype=np.int32)
    if timestep_map.shape != (n,):
      raise ValueError(f"timestep_map has shape {timestep_map.shape}; expected ({n},).")
    self._tables = {k: np.asarray(v, dtype=np.float64) for k, v in tables.items()}
    self._tables["timestep_map"] = timestep_map
    self._static = (target, var_type, loss_type, n)

  # --- pytree plumbing: arrays are leaves, the configuration is static. ---
  def tree_flatten(self):
    keys = sorted(self._tables)
    return [self._tables[k] for k in keys], (keys, self._static)

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    obj = object.__new__(cls)
    keys, obj._static = aux
    obj._tables = dict(zip(keys, leaves))
    return obj

  def __getattr__(self, name):
    tables = self.__dict__.get("_tables", {})
    if name in tables:
      return tables[name]
    raise AttributeError(name)

  target = property(lambda self: self._static[0])
  var_type = property(lambda self: self._static[1])
  loss_type = property(lambda self: self._static[2])
  num_timesteps = property(lambda self: self._static[3])
  learns_sigma = property(lambda self: self.var_type == "learned_range")

  def respace(self, section_counts) -> "GaussianDiffusion":
    """The same process visiting only some steps (guided-diffusion's SpacedDiffusion).

    `section_counts` as in `schedules.space_timesteps` ("ddim50", "10,20", [25]).
    The new diffusion's model timesteps map back to the original training scale.
    """
    keep = schedules.space_timesteps(self.num_timesteps, section_counts)
    betas, index = schedules.respace_betas(self._tables["betas"], keep)
    target, var_type, loss_type, _ = self._static
    return GaussianDiffusion(betas, target=target, var_type=var_type, loss_type=loss_type,
                             timestep_map=self._tables["timestep_map"][index])

  def __repr__(self):
    return (f"GaussianDiffusion(T={self.num_timesteps}, target={self.target!r}, "
            f"var_type={self.var_type!r}, loss_type={self.loss_type!r})")

  def _at(self, name: str, t, x) -> jax.Array:
    return _extract(jnp.asarray(self._tables[name], _compute_dtype(x)), t, x.ndim)

  # --- forward process ---
  def q_mean_variance(self, x_start, t):
    """Mean, variance and log-variance of q(x_t | x_0), each x_start's shape."""
    mean = self._at("sqrt_alphas_cumprod", t, x_start) * x_start
    var = self._at("alphas_cumprod", t, x_start)
    return (mean, jnp.broadcast_to(1.0 - var, x_start.shape),
            jnp.broadcast_to(self._at("log_one_minus_alphas_cumprod", t, x_start),
                             x_start.shape))

  def q_sample(self, x_start, t, noise):
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
    if noise.shape != x_start.shape:
      raise ValueError(f"noise has shape {noise.shape}; x_start has {x_start.shape}.")
    return (self._at("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
    mean = (self._at("posterior_mean_coef1", t, x_t) * x_start
            + self._at("posterior_mean_coef2", t, x_t) * x_t)
    var = jnp.broadcast_to(self._at("posterior_variance", t, x_t), x_t.shape)
    log_var = jnp.broadcast_to(self._at("posterior_log_variance_clipped", t, x_t), x_t.shape)
    return mean, var, log_var

  # --- conversions between ε, x0 and v at fixed x_t ---
  def predict_xstart_from_eps(self, x_t, t, eps):
    return (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    return ((self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
            / self._at("sqrt_recipm1_alphas_cumprod", t, x_t))

  def predict_xstart_from_v(self, x_t, t, v):
    return (self._at("sqrt_alphas_cumprod", t, x_t) * x_t
            - self._at("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

  def predict_v(self, x_start, t, noise):
    """v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho)."""
    return (self._at("sqrt_alphas_cumprod", t, x_start) * noise
            - self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

  def predict_xstart(self, x_t, t, model_out):
    """x̂_0 from the mean part of the network output, whatever the target."""
    if self.target == "eps":
      return self.predict_xstart_from_eps(x_t, t, model_out)
    if self.target == "v":
      return self.predict_xstart_from_v(x_t, t, model_out)
    return model_out

  def training_target(self, x_start, t, noise):
    """What the network regresses onto: ε, x_0 or v."""
    if self.target == "eps":
      return noise
    if self.target == "v":
      return self.predict_v(x_start, t, noise)
    return x_start

  # --- the reverse process ---
  def model_timesteps(self, t):
    """The timestep values the network sees for steps `t` (original scale)."""
    return jnp.asarray(self._tables["timestep_map"])[t]

  def split_model_output(self, model_output, x):
    """(mean part, variance part or None), checking the output's shape against x."""
    channels = x.shape[-1] * (2 if self.learns_sigma else 1)
    expected = x.shape[:-1] + (channels,)
    if model_output.shape != expected:
      raise ValueError(
          f"Model output has shape {tuple(model_output.shape)}; expected {expected} for "
          f"input {tuple(x.shape)} with var_type={self.var_type!r} (a learned variance "
          "needs 2C output channels: learn_sigma must match).")
    model_output = model_output.astype(_compute_dtype(x))
    if self.learns_sigma:
      return jnp.split(model_output, 2, axis=-1)
    return model_output, None

  def model_variance(self, x, t, var_values=None):
    """(variance, log_variance) of p(x_{t−1} | x_t), each x's shape."""
    if self.var_type == "learned_range":
      min_log = self._at("posterior_log_variance_clipped", t, x)
      max_log = self._at("log_betas", t, x)
      frac = (var_values + 1.0) / 2.0
      log_var = frac * max_log + (1.0 - frac) * min_log
      return jnp.exp(log_var), log_var
    if self.var_type == "fixed_small":
      var, log_var = "posterior_variance", "posterior_log_variance_clipped"
    else:
      var, log_var = "fixed_large_variance", "fixed_large_log_variance"
    return (jnp.broadcast_to(self._at(var, t, x), x.shape),
            jnp.broadcast_to(self._at(log_var, t, x), x.shape))

  def p_mean_variance(self, model_fn: ModelFn, x, t, clip_denoised: bool = True,
                      denoised_fn=None, model_output=None):
    """p(x_{t−1} | x_t) and the x_0 prediction.

    Returns dict(mean, variance, log_variance, pred_xstart), each x's shape.
    `model_output` skips the network call when the output is already known.
    """
    if model_output is None:
      model_output = model_fn(x, self.model_timesteps(t))
    mean_out, var_values = self.split_model_output(model_output, x)
    variance, log_variance = self.model_variance(x, t, var_values)
    pred_xstart = self.predict_xstart(x, t, mean_out)
    if denoised_fn is not None:
      pred_xstart = denoised_fn(pred_xstart)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance,
            "pred_xstart": pred_xstart}

  # --- losses ---
  def vb_terms_bpd(self, model_fn: ModelFn, x_start, x_t, t, clip_denoised: bool = True,
                   model_output=None):
    """One VLB term per example in bits/dim: the decoder NLL at t=0, else the KL.

    Returns dict(output (B,), pred_xstart).
    """
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_fn, x_t, t, clip_denoised=clip_denoised,
                               model_output=model_output)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
    nll = -discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    nll = mean_flat(nll)
    output = jnp.where(t == 0, nll, kl) / math.log(2.0)
    return {"output": output, "pred_xstart": out["pred_xstart"]}

  def training_losses(self, model_fn: ModelFn, x_start, t, noise) -> dict:
    """The per-example terms of the training loss, each (B,), before any weighting.

    `mse`: the unweighted MSE of the target. `vb`, with a learned variance or a kl loss
    type: the VLB term in bits/dim (with a learned variance trained through the variance
    channels alone; scaled by T/1000 for rescaled_mse and by T for rescaled_kl). The
    objective (`objective.Objective`) weights and combines them.
    """
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, self.model_timesteps(t))
    mean_out, var_values = self.split_model_output(model_output, x_start)
    terms = {"mse": mean_flat((self.training_target(x_start, t, noise) - mean_out) ** 2)}
    if self.loss_type in ("kl", "rescaled_kl"):
      vb = self.vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=False,
                             model_output=model_output)["output"]
      terms["vb"] = vb * self.num_timesteps if self.loss_type == "rescaled_kl" else vb
    elif self.learns_sigma:
      frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_values], axis=-1)
      vb = self.vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=False,
                             model_output=frozen)["output"]
      if self.loss_type == "rescaled_mse":
        vb = vb * (self.num_timesteps / 1000.0)
      terms["vb"] = vb
    return terms

  def prior_bpd(self, x_start):
    """KL(q(x_T | x_0) ‖ N(0, I)) per example, in bits/dim: (B,)."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = self.q_mean_variance(x_start, t)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)

  def calc_bpd_loop(self, model_fn: ModelFn, x_start, key, clip_denoised: bool = True):
    """The full variational bound in bits/dim, one step at a time under `lax.scan`.

    Returns dict of total_bpd and prior_bpd (B,), and per-step vb, xstart_mse and mse
    (B, T), with the step axis in increasing t.
    """
    batch = x_start.shape[0]

    def one_step(carry, inputs):
      t_scalar, step_key = inputs
      t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
      noise = jax.random.normal(step_key, x_start.shape, x_start.dtype)
      x_t = self.q_sample(x_start, t, noise)
      out = self.vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=clip_denoised)
      eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
      return carry, (out["output"], mean_flat((out["pred_xstart"] - x_start) ** 2),
                     mean_flat((eps - noise) ** 2))

    steps = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    keys = jax.random.split(key, self.num_timesteps)
    _, (vb, xstart_mse, mse) = jax.lax.scan(one_step, None, (steps, keys))
    # scan ran from t=T−1 down to 0: flip to increasing t, then (T, B) -> (B, T).
    vb, xstart_mse, mse = (a[::-1].T for a in (vb, xstart_mse, mse))
    prior = self.prior_bpd(x_start)
    return {"total_bpd": vb.sum(axis=1) + prior, "prior_bpd": prior, "vb": vb,
            "xstart_mse": xstart_mse, "mse": mse}


def create_diffusion(schedule: str = "linear", num_timesteps: int = 1000,
                     timestep_respacing: str = "", **kwargs) -> GaussianDiffusion:
  """A diffusion from a named schedule, respaced if asked (guided-diffusion semantics).

  `kwargs` go to `GaussianDiffusion` (target, var_type, loss_type).
  """
  diff = GaussianDiffusion(schedules.get_named_beta_schedule(schedule, num_timesteps),
                           **kwargs)
  return diff.respace(timestep_respacing) if timestep_respacing else diff
