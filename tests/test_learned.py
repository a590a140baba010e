"""The learned (EDM2-style) weighting: its loss, its optimum, training, checkpoint, plot."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_lib
from diffusion_jax import run as run_lib
from diffusion_jax.core.objective import learned
from diffusion_jax.evaluation import analyses
from diffusion_jax.evaluation import plots
from diffusion_jax.training import train
from tests import tiny_config


def test_starts_as_the_base_weighting():
  lw = learned.LearnedWeighting()
  state = lw.init(jax.random.PRNGKey(0))
  mse = jnp.array([0.5, 2.0, 7.0])
  lam = jnp.array([-5.0, 0.0, 5.0])
  np.testing.assert_allclose(lw.per_example_loss(state["params"], state, mse, lam), mse)
  np.testing.assert_allclose(lw.effective_weight(state, np.array([1.0, 3.0]),
                                                 np.array([0.0, 1.0])), [1.0, 3.0])


def test_its_optimum_is_the_loss_scale_of_each_noise_level():
  """Minimising E[w₀·mse/exp(u) + u] over u gives exp(u(λ)) = E[w₀·mse | λ]."""
  lw = learned.LearnedWeighting(lr=3e-2)
  state = lw.init(jax.random.PRNGKey(0))
  lam = jnp.linspace(-8.0, 8.0, 9)
  scale = jnp.exp(0.3 * lam)  # a loss scale that varies 100-fold over λ
  noise = jax.random.exponential(jax.random.PRNGKey(1), (2000, 9))  # mean 1

  @jax.jit
  def step(st):
    g = jax.grad(lambda p: jnp.mean(jax.vmap(
        lambda n: lw.per_example_loss(p, st, scale * n, lam))(noise)))(st["params"])
    return lw.update(st, g, None, None, lam)

  for _ in range(3000):
    state = step(state)
  np.testing.assert_allclose(np.exp(lw.u(state["params"], lam)), scale, rtol=0.06)


def _learned_config():
  config = tiny_config.get_config()
  config.diffusion.weighting = "learned"
  config.diffusion.weighting_params.base = "debias"
  return config


def test_learned_weighting_trains_checkpoints_and_plots(tmp_path):
  config = _learned_config()
  config.train.update(num_steps=4, checkpoint_every=2)
  state = train.train_and_sample(config, str(tmp_path))
  u_state = state.objective_state[learned.LearnedWeighting.STATE_KEY]
  out_kernel = u_state["params"]["out"]["kernel"]
  assert float(jnp.abs(out_kernel).max()) > 0  # u moved off its zero start
  restored = run_lib.load_checkpoint(str(tmp_path))
  for a, b in zip(jax.tree_util.tree_leaves(restored.objective_state),
                  jax.tree_util.tree_leaves(jax.device_get(state.objective_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  run = run_lib.open_run(str(tmp_path))
  curve = analyses.weight_curve(run)
  assert len(curve["effective"]) == 1000 and curve["base_name"] == "debias"
  assert np.all(np.isfinite(curve["effective"])) and np.all(np.asarray(curve["effective"]) > 0)
  path = plots.plot_weight_curves({"learned": curve}, run.diffusion,
                                     str(tmp_path / "learned_weight.png"))
  assert (tmp_path / "learned_weight.png").stat().st_size > 10_000 and path


def test_learned_weighting_config_errors():
  config = _learned_config()
  config.diffusion.weighting_params.base = "learned"
  with pytest.raises(config_lib.ConfigError, match="base cannot be a stateful weighting"):
    config_lib.validate_config(config, num_devices=1)
  config = _learned_config()
  config.diffusion.loss_type = "kl"
  with pytest.raises(config_lib.ConfigError, match="loss_type='kl' has none"):
    config_lib.validate_config(config, num_devices=1)
  config = _learned_config()
  config.optim.learned_weight_lr = 0.0
  with pytest.raises(config_lib.ConfigError, match="optim.learned_weight_lr"):
    config_lib.validate_config(config, num_devices=1)
