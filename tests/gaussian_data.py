"""Gaussian data, where the exact ε/x0/v predictor is known in closed form (sampler tests)."""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import diffusion as diffusion_lib
from diffusion_jax.sampling import samplers

MU = np.array([0.3, -0.2, 0.1], np.float32)   # per channel
STD = np.array([0.2, 0.35, 0.5], np.float32)
SHAPE = (2000, 2, 2, 3)


def _interp(table, t):
  t = t.astype(table.dtype)
  i0 = jnp.clip(jnp.floor(t), 0, table.shape[0] - 2).astype(jnp.int32)
  w = t - i0
  return table[i0] * (1 - w) + table[i0 + 1] * w


def abar_at(diffusion, t, rule="log_alpha", dtype=jnp.float32):
  """ᾱ at integer or fractional steps: log √ᾱ interpolated linearly (the solvers' rule),
  or with rule="log_sigma" log σ = ½·log((1 − ᾱ)/ᾱ) (EDM's samplers, k-diffusion)."""
  abar = np.asarray(diffusion.alphas_cumprod, np.float64)
  if rule == "log_alpha":
    return jnp.exp(2 * _interp(jnp.asarray(0.5 * np.log(abar), dtype), t))
  log_sigma = _interp(jnp.asarray(0.5 * np.log((1 - abar) / abar), dtype), t)
  return 1 / (1 + jnp.exp(2 * log_sigma))


def exact_model(diffusion, target="eps", rule="log_alpha"):
  """The exact ε/x0/v predictor for x0 ~ N(MU, diag(STD²)), at the model's timesteps
  (fractional ones by `rule`, see abar_at)."""
  def fn(x, t):
    abar = abar_at(diffusion, t, rule, x.dtype)[:, None, None, None]
    a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    eps = s * (x - a * MU) / (a**2 * STD**2 + s**2)
    x0 = (x - s * eps) / a
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[target]
  return fn


def make_diffusion(target="eps", schedule="linear"):
  return diffusion_lib.create_diffusion(schedule, 1000, target=target, var_type="fixed_small")


def run_sampler(diff, sampler, steps, target="eps", key=0, rule="log_alpha", **kw):
  fn = jax.jit(lambda k: samplers.sample(diff, exact_model(diff, target, rule), SHAPE, k,
                                         sampler=sampler, steps=steps, clip_denoised=False,
                                         **kw))
  return np.asarray(fn(jax.random.PRNGKey(key)), np.float64)


