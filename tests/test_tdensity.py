import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import diffusion as diffusion_lib
from diffusion_jax.core import objective
from diffusion_jax.core.objective import tdensity


def test_uniform_sampler():
  s = tdensity.TimestepDensity("uniform", 10)
  t, w = s.sample(s.init(), jax.random.PRNGKey(0), 4000)
  assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 9
  np.testing.assert_allclose(w, 1.0)
  assert np.bincount(np.asarray(t), minlength=10).min() > 300


def test_second_moment_sampler_matches_its_definition():
  s = tdensity.TimestepDensity("loss-second-moment", 4, history_per_term=2,
                               uniform_prob=0.1)
  state = s.init()
  np.testing.assert_allclose(s.probabilities(state), 0.25)  # not warmed up
  # Fill every history; t=3 gets three losses so its oldest is dropped.
  t = jnp.array([0, 0, 1, 1, 2, 2, 3, 3, 3])
  losses = jnp.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 9.0, 4.0, 4.0])
  state = jax.jit(s.update)(state, t, losses)
  np.testing.assert_array_equal(state["loss_counts"], [2, 2, 2, 2])
  np.testing.assert_allclose(state["loss_history"][3], [4.0, 4.0])
  rms = np.array([1.0, 2.0, 3.0, 4.0])
  want = rms / rms.sum() * 0.9 + 0.1 / 4
  np.testing.assert_allclose(s.probabilities(state), want, rtol=1e-6)
  tt, w = s.sample(state, jax.random.PRNGKey(1), 20000)
  freq = np.bincount(np.asarray(tt), minlength=4) / 20000
  np.testing.assert_allclose(freq, want, atol=0.015)
  np.testing.assert_allclose(w, 1 / (4 * want[np.asarray(tt)]), rtol=1e-5)
  # Importance weights keep the estimate of the uniform mean unbiased.
  per_t = np.array([5.0, 1.0, 2.0, 7.0])
  assert float(np.mean(w * per_t[np.asarray(tt)])) == pytest.approx(per_t.mean(), rel=0.03)


def test_unknown_sampler_and_misused_options():
  with pytest.raises(ValueError, match="'uniform', 'loss-second-moment', 'importance'"):
    tdensity.TimestepDensity("karras", 10)
  with pytest.raises(ValueError, match="build it with TimestepDensity.for_tables"):
    tdensity.TimestepDensity("importance", 10)
  diff = _diffusion("debias")
  with pytest.raises(ValueError, match="density_is_weight applies to the logit_normal"):
    _for("importance", diff, density_is_weight=True)
  with pytest.raises(ValueError, match="scale=0.0: must be > 0"):
    _for("logit_normal", diff, scale=0.0)


class _Tables:
  """The (T,) loss_weight and log_snr tables of `weighting` on the linear schedule."""

  def __init__(self, weighting):
    built = objective.build(diffusion_lib.create_diffusion("linear", 1000), weighting)
    self.loss_weight, self.log_snr = built.loss_weight, built.diffusion.log_snr


def _diffusion(weighting):
  return _Tables(weighting)


def _for(name, tables, **kwargs):
  return tdensity.TimestepDensity.for_tables(name, tables.loss_weight, tables.log_snr,
                                             **kwargs)


@pytest.mark.parametrize("weighting", ["debias", "constant", "min_snr", "p2"])
@pytest.mark.parametrize("name", ["importance", "logit_normal", "laplace_logsnr"])
def test_every_fixed_density_keeps_the_uniform_objective_exactly(weighting, name):
  """Σ_t p(t)·weight(t)·w(t)·L(t) = (1/T)·Σ_t w(t)·L(t) for any per-step losses L, in
  float64 over the full t range; `importance` makes each example's factor constant."""
  diff = _diffusion(weighting)
  s = _for(name, diff)
  p = np.asarray(s.density, np.float64)
  assert p.shape == (1000,) and np.all(p > 0) and np.isclose(p.sum(), 1.0, rtol=1e-12)
  weight = 1.0 / (1000 * p)  # what `sample` returns for t
  losses = np.random.default_rng(0).gamma(2.0, size=1000)
  w = np.asarray(diff.loss_weight)
  np.testing.assert_allclose(np.sum(p * weight * w * losses), np.mean(w * losses), rtol=1e-12)
  if name == "importance":
    np.testing.assert_allclose(weight * w, np.mean(w), rtol=1e-9)
  t, sampled = s.sample(s.init(), jax.random.PRNGKey(0), 8)
  np.testing.assert_allclose(sampled, weight[np.asarray(t)], rtol=1e-5)


def test_fixed_densities_have_their_shapes():
  diff = _diffusion("debias")
  logit = np.asarray(tdensity.fixed_density("logit_normal", diff.loss_weight, diff.log_snr))
  assert abs(int(np.argmax(logit)) - 500) <= 1  # loc 0: the mode at t = T/2
  lap = np.asarray(tdensity.fixed_density("laplace_logsnr", diff.loss_weight, diff.log_snr,
                                          mu=0.0, b=0.5))
  assert abs(float(diff.log_snr[int(np.argmax(lap))])) < 0.05  # the mode where log-SNR = 0
  # Half the Laplace mass lies on each side of log-SNR = mu.
  assert np.isclose(lap[np.asarray(diff.log_snr) > 0].sum(), 0.5, atol=0.01)
  debias = np.asarray(tdensity.fixed_density("importance", diff.loss_weight, diff.log_snr))
  assert debias[999] / debias[0] > 1000  # 1/√SNR grows ~1e4-fold over t


def test_density_as_weight_returns_unit_weights_and_draws_the_density():
  s = _for("logit_normal", _diffusion("constant"),
                                             density_is_weight=True)
  t, w = s.sample(s.init(), jax.random.PRNGKey(0), 20000)
  np.testing.assert_array_equal(w, 1.0)
  hist = np.bincount(np.asarray(t) // 100, minlength=10) / 20000
  want = np.asarray(s.density).reshape(10, 100).sum(1)
  np.testing.assert_allclose(hist, want, atol=0.01)
