"""The objective: weight tables, stateful weightings by name, and its state in training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import diffusion as diffusion_lib
from diffusion_jax.core import objective
from diffusion_jax.core import schedules
from diffusion_jax.core.objective import weighting


def _diffusion(betas=None, **kwargs):
  betas = schedules.get_named_beta_schedule("linear", 100) if betas is None else betas
  return diffusion_lib.GaussianDiffusion(betas, **kwargs)


def test_bad_weightings_name_the_problem():
  with pytest.raises(ValueError, match="Unknown loss weighting 'unbias'.*'debias'"):
    objective.build(_diffusion(), "unbias")
  # A schedule that reaches ᾱ=0 makes 1/√SNR infinite at the last step.
  zero_terminal = np.append(schedules.get_named_beta_schedule("linear", 100)[:-1], 1.0)
  with pytest.raises(ValueError, match="not finite at steps \\[99\\]"):
    objective.build(_diffusion(zero_terminal), "debias")
  built = objective.build(_diffusion(zero_terminal), "debias", {"max_weight": 1e3})
  assert built.loss_weight[-1] == 1e3
  with pytest.raises(ValueError, match="takes parameters none; got unknown \\['base'\\]"):
    objective.build(_diffusion(), "debias", {"base": "p2"})


def test_a_stateful_weighting_starts_from_its_base_table():
  diff = _diffusion()
  built = objective.build(diff, "learned", {"base": "p2"})
  np.testing.assert_array_equal(built.loss_weight, weighting.loss_weight("p2", diff.snr))
  assert built.term.base == "p2"
  default = objective.build(diff, "learned")
  np.testing.assert_array_equal(default.loss_weight, weighting.loss_weight("debias", diff.snr))
  with pytest.raises(ValueError, match="base cannot be a stateful weighting"):
    objective.build(diff, "learned", {"base": "learned"})
  with pytest.raises(ValueError, match="loss_type='kl' has none"):
    objective.build(_diffusion(loss_type="kl"), "learned")
  assert "learned" in objective.available() and "debias" in objective.available()


def test_the_loss_is_the_weighted_mse_plus_the_vlb_under_importance_weights():
  diff = _diffusion(var_type="learned_range", loss_type="rescaled_mse")
  built = objective.build(diff, "min_snr", timestep_density="importance")
  state = built.init(jax.random.PRNGKey(0))
  t, weights = built.sample_t(state, jax.random.PRNGKey(1), 8)
  x0 = jax.random.uniform(jax.random.PRNGKey(2), (8, 4, 4, 3), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.PRNGKey(3), x0.shape)
  model = lambda x, tt: jnp.concatenate([0.5 * x, jnp.tanh(x)], axis=-1)
  loss, terms = built.loss(model, None, state, x0, t, weights, noise)
  raw = diff.training_losses(model, x0, t, noise)
  w = built.loss_weight[np.asarray(t)]
  np.testing.assert_allclose(terms["mse"], w * np.asarray(raw["mse"]), rtol=1e-6)
  np.testing.assert_allclose(terms["loss"], terms["mse"] + raw["vb"], rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(np.asarray(terms["loss"]) * weights), rtol=1e-6)
  # Under `importance` every example's factor w(t)/(T·p(t)) is the constant mean_t w(t).
  np.testing.assert_allclose(w * np.asarray(weights), np.mean(built.loss_weight), rtol=1e-5)
