import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import schedules
from diffusion_jax.core.objective import weighting

SNR = np.logspace(-5, 5, 41)

FORMULAS = {
    "constant": lambda s: np.ones_like(s),
    "debias": lambda s: s ** -0.5,
    "snr": lambda s: 1 / s,
    "p2": lambda s: 1 / (1 + s),
    "min_snr": lambda s: np.where(s < 5, 1.0, 5 / s),
    "truncated_snr": lambda s: np.where(s > 1, 1.0, 1 / s),
    "edm": lambda s: (1 / s + 0.25) / 0.25,
    "sigmoid": lambda s: 1 / (1 + np.exp(np.log(s))),
}


def test_registry_is_complete():
  assert sorted(weighting.available()) == sorted(FORMULAS)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_each_weighting_matches_its_formula(name):
  np.testing.assert_allclose(weighting.loss_weight(name, SNR), FORMULAS[name](SNR),
                             rtol=1e-12)


def test_parameters():
  np.testing.assert_allclose(weighting.loss_weight("p2", SNR, k=2.0, gamma=0.5),
                             (2 + SNR) ** -0.5, rtol=1e-12)
  np.testing.assert_allclose(weighting.loss_weight("min_snr", SNR, gamma=1.0),
                             np.minimum(SNR, 1) / SNR, rtol=1e-12)
  np.testing.assert_allclose(weighting.loss_weight("sigmoid", SNR, bias=-2.0),
                             1 / (1 + np.exp(np.log(SNR) + 2)), rtol=1e-10)
  np.testing.assert_allclose(weighting.loss_weight("edm", SNR, sigma_data=1.0),
                             1 / SNR + 1, rtol=1e-12)
  assert weighting.parameters("p2") == {"k": 1.0, "gamma": 1.0}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_conversion_gives_the_same_objective_for_every_target(name):
  """w_eps·‖ε̂−ε‖² = w_x0·‖x̂0−x0‖² = w_v·‖v̂−v‖² for the same prediction error."""
  rng = np.random.default_rng(0)
  abar = rng.uniform(1e-4, 1 - 1e-4, size=32)
  snr = abar / (1 - abar)
  a, s = np.sqrt(abar)[:, None], np.sqrt(1 - abar)[:, None]
  x0, eps = rng.normal(size=(2, 32, 16))
  x_t = a * x0 + s * eps
  x0_hat = x0 + rng.normal(size=x0.shape)  # an arbitrary prediction
  eps_hat = (x_t - a * x0_hat) / s
  v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
  losses = {
      "eps": weighting.loss_weight(name, snr) * np.mean((eps_hat - eps) ** 2, 1),
      "x0": weighting.loss_weight(name, snr, target="x0") * np.mean((x0_hat - x0) ** 2, 1),
      "v": weighting.loss_weight(name, snr, target="v") * np.mean((v_hat - v) ** 2, 1),
  }
  np.testing.assert_allclose(losses["x0"], losses["eps"], rtol=1e-6)
  np.testing.assert_allclose(losses["v"], losses["eps"], rtol=1e-6)


def test_target_space_is_the_raw_weight():
  np.testing.assert_allclose(
      weighting.loss_weight("debias", SNR, target="x0", space="target"), SNR ** -0.5)


def test_normalize_and_debias_mean():
  snr = schedules.derived_arrays(schedules.get_named_beta_schedule("linear", 1000))["snr"]
  assert np.mean(weighting.loss_weight("debias", snr)) == pytest.approx(17.8, abs=0.05)
  w = weighting.loss_weight("debias", snr, normalize=True)
  assert np.mean(w) == pytest.approx(1.0, rel=1e-12)
  w_batch = weighting.loss_weight("debias", snr[:4], normalize=True, reference_snr=snr)
  np.testing.assert_allclose(w_batch, w[:4], rtol=1e-12)


def test_max_weight():
  w = weighting.loss_weight("snr", SNR, max_weight=10.0)
  assert w.max() == 10.0
  np.testing.assert_allclose(w, np.minimum(1 / SNR, 10.0))


def test_jit_and_vmap():
  snr = jnp.asarray(SNR, jnp.float32)
  for name in weighting.available():
    f = jax.jit(lambda s, name=name: weighting.loss_weight(name, s, target="v"))
    np.testing.assert_allclose(f(snr), weighting.loss_weight(name, SNR, target="v"),
                               rtol=2e-5)
    np.testing.assert_allclose(jax.vmap(f)(snr[:, None])[:, 0], f(snr), rtol=1e-6)


def test_bad_names():
  with pytest.raises(ValueError, match="choose one of .*'debias'"):
    weighting.loss_weight("debiased", SNR)
  with pytest.raises(ValueError, match="gamma"):
    weighting.loss_weight("min_snr", SNR, gama=5.0)
  with pytest.raises(ValueError, match="'eps', 'x0', 'v'"):
    weighting.loss_weight("debias", SNR, target="score")
  with pytest.raises(ValueError, match="'eps', 'target'"):
    weighting.loss_weight("debias", SNR, space="x0")
