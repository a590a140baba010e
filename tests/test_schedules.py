import math

import numpy as np
import pytest

from diffusion_jax.core import schedules


def test_linear_values_at_known_indices():
  b = schedules.get_named_beta_schedule("linear", 1000)
  assert b.dtype == np.float64 and b.shape == (1000,)
  assert b[0] == pytest.approx(1e-4, rel=1e-12)
  assert b[999] == pytest.approx(0.02, rel=1e-12)
  assert b[500] == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, rel=1e-12)
  # Scaled by 1000/T for other T.
  b100 = schedules.get_named_beta_schedule("linear", 100)
  assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)


def test_cosine_values_at_known_indices():
  b = schedules.get_named_beta_schedule("cosine", 1000)
  f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  for i in (0, 1, 500, 998):
    assert b[i] == pytest.approx(1 - f((i + 1) / 1000) / f(i / 1000), rel=1e-10)
  assert b[999] == pytest.approx(0.999)  # capped: ᾱ(1) = 0
  abar = np.cumprod(1 - b)
  assert abar[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-9)


def test_derived_arrays():
  b = schedules.get_named_beta_schedule("linear", 1000)
  d = schedules.derived_arrays(b)
  abar = np.cumprod(1 - b)
  np.testing.assert_allclose(d["alphas_cumprod"], abar)
  np.testing.assert_allclose(d["snr"], abar / (1 - abar))
  np.testing.assert_allclose(d["log_snr"], np.log(abar / (1 - abar)), rtol=1e-12)
  assert d["posterior_variance"][0] == 0.0
  assert d["posterior_log_variance_clipped"][0] == d["posterior_log_variance_clipped"][1]
  t = 10
  np.testing.assert_allclose(d["posterior_variance"][t],
                             b[t] * (1 - abar[t - 1]) / (1 - abar[t]))
  np.testing.assert_allclose(d["posterior_mean_coef1"][t] + d["posterior_mean_coef2"][t]
                             * 0, b[t] * np.sqrt(abar[t - 1]) / (1 - abar[t]))


def test_space_timesteps():
  assert schedules.space_timesteps(1000, "") == set(range(1000))
  assert schedules.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
  kept = sorted(schedules.space_timesteps(1000, "10,20"))
  assert len(kept) == 30
  first, second = kept[:10], kept[10:]
  assert first[0] == 0 and first[-1] == 499
  assert first == [round(i * 499 / 9) for i in range(10)]
  assert second[0] == 500 and second[-1] == 999
  assert second == [500 + round(i * 499 / 19) for i in range(20)]
  assert schedules.space_timesteps(10, [3]) == {0, 4, 9}  # 4.5 rounds to even


def test_space_timesteps_errors():
  with pytest.raises(ValueError, match="ddim"):
    schedules.space_timesteps(1000, "ddim999")
  with pytest.raises(ValueError, match="comma-separated"):
    schedules.space_timesteps(1000, "fast")
  with pytest.raises(ValueError, match="Cannot divide"):
    schedules.space_timesteps(10, "20")


def test_respace_keeps_alphas_cumprod():
  b = schedules.get_named_beta_schedule("cosine", 1000)
  keep = schedules.space_timesteps(1000, "ddim25")
  nb, tmap = schedules.respace_betas(b, keep)
  np.testing.assert_allclose(np.cumprod(1 - nb), np.cumprod(1 - b)[tmap], rtol=1e-12)
  assert list(tmap) == sorted(keep)


def test_unknown_schedule():
  with pytest.raises(ValueError, match=r"\['linear', 'cosine'\]"):
    schedules.get_named_beta_schedule("quadratic", 10)
