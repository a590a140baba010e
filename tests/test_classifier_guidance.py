"""Classifier guidance on a two-class Gaussian mixture, where both the unconditional
denoiser and the noisy classifier p(y | x_t) are exact: with scale 1 the guided sampler
draws the chosen class's Gaussian (Bayes: ∇ log p(x_t) + ∇ log p(y | x_t) = ∇ log p(x_t | y))."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.sampling import samplers
from tests.gaussian_data import abar_at
from tests.gaussian_data import make_diffusion

CLASS_MEANS = np.array([-0.5, 0.5], np.float32)  # every dimension, per class
STD = 0.2
SHAPE = (1000, 2, 2, 3)


def _per_class(diffusion, x, t):
  """(log N(x_t; √ᾱ μ_y, (ᾱ s² + 1 − ᾱ) I) per class (B, 2), ᾱ (B, 1, 1, 1))."""
  abar = abar_at(diffusion, t)[:, None, None, None]
  var = abar * STD**2 + 1 - abar
  log_density = jnp.stack([
      -0.5 * jnp.sum((x - jnp.sqrt(abar) * m) ** 2 / var + jnp.log(var), axis=(1, 2, 3))
      for m in CLASS_MEANS], axis=1)
  return log_density, abar


def noisy_classifier(diffusion):
  def log_prob(x, t):
    log_density, _ = _per_class(diffusion, x, t)
    return jax.nn.log_softmax(log_density, axis=1)  # equal class priors
  return log_prob


def mixture_eps(diffusion):
  """The exact E[ε | x_t] of the equal-weight mixture."""
  def fn(x, t):
    log_density, abar = _per_class(diffusion, x, t)
    post = jax.nn.softmax(log_density, axis=1)
    a, s2 = jnp.sqrt(abar), 1 - abar
    x0 = sum(post[:, y, None, None, None] * (m + a * STD**2 / (abar * STD**2 + s2)
                                              * (x - a * m))
             for y, m in enumerate(CLASS_MEANS))
    return (x - a * x0) / jnp.sqrt(s2)
  return fn


def _run(sampler, steps, scale, labels):
  diff = make_diffusion()
  guidance = samplers.ClassifierGuidance(noisy_classifier(diff), jnp.asarray(labels), scale)
  fn = jax.jit(lambda k: samplers.sample(diff, mixture_eps(diff), SHAPE, k, sampler=sampler,
                                         steps=steps, clip_denoised=False, guidance=guidance))
  return np.asarray(fn(jax.random.PRNGKey(0)), np.float64)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 100), ("unipc", 20),
                                           ("heun", 32)])
def test_scale_one_draws_the_chosen_class(sampler, steps):
  labels = np.arange(SHAPE[0]) % 2
  x = _run(sampler, steps, 1.0, labels)
  for y in (0, 1):
    mine = x[labels == y]
    np.testing.assert_allclose(mine.mean(), CLASS_MEANS[y], atol=0.02)
    np.testing.assert_allclose(mine.std(), STD, rtol=0.1)
    assert np.mean(np.sign(mine.mean(axis=(1, 2, 3))) == np.sign(CLASS_MEANS[y])) > 0.99


def test_scale_zero_is_the_unconditional_mixture():
  x = _run("ddim", 100, 0.0, np.ones(SHAPE[0], np.int32))
  side = np.sign(x.mean(axis=(1, 2, 3)))
  assert 0.4 < np.mean(side > 0) < 0.6  # both modes, whatever the label


@pytest.mark.parametrize("target", ["x0", "v"])
def test_x0_and_v_models_are_guided_like_the_eps_model(target):
  labels = jnp.asarray(np.arange(SHAPE[0]) % 2)
  runs = {}
  for name in ("eps", target):
    diff = make_diffusion(name)
    eps_fn = mixture_eps(diff)

    def model(x, t, name=name, diff=diff, eps_fn=eps_fn):
      eps = eps_fn(x, t)
      abar = abar_at(diff, t)[:, None, None, None]
      a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
      x0 = (x - s * eps) / a
      return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[name]

    guidance = samplers.ClassifierGuidance(noisy_classifier(diff), labels, 1.0)
    runs[name] = np.asarray(samplers.sample(diff, model, SHAPE, jax.random.PRNGKey(1),
                                            sampler="ddim", steps=20, clip_denoised=False,
                                            guidance=guidance))
  np.testing.assert_allclose(runs[target], runs["eps"], atol=2e-4)
