import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import resample


def test_uniform_sampler():
  s = resample.TimestepSampler("uniform", 10)
  t, w = s.sample(s.init(), jax.random.PRNGKey(0), 4000)
  assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 9
  np.testing.assert_allclose(w, 1.0)
  assert np.bincount(np.asarray(t), minlength=10).min() > 300


def test_second_moment_sampler_matches_its_definition():
  s = resample.TimestepSampler("loss-second-moment", 4, history_per_term=2,
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


def test_unknown_sampler():
  with pytest.raises(ValueError, match="'uniform', 'loss-second-moment'"):
    resample.TimestepSampler("importance", 10)
