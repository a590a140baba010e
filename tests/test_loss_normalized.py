"""The loss-normalised weighting: its start, its running means, its fixed point, training."""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import run as run_lib
from diffusion_jax.core.objective import loss_normalized
from diffusion_jax.evaluation import analyses
from diffusion_jax.training import train
from tests import tiny_config

TERM = loss_normalized.LossNormalizedWeighting()


def test_starts_as_the_base_weighting():
  state = TERM.init(jax.random.PRNGKey(0))
  mse = jnp.array([0.5, 2.0, 7.0])
  lam = jnp.array([-5.0, 0.0, 5.0])
  np.testing.assert_array_equal(TERM.per_example_loss(None, state, mse, lam), mse)
  np.testing.assert_array_equal(TERM.effective_weight(state, np.array([1.0, 3.0, 2.0]), lam),
                                [1.0, 3.0, 2.0])


def test_the_first_batch_sets_a_bin_and_later_ones_average_into_it():
  lam = jnp.array([-11.9, -11.9, 0.1, 30.0])  # 30 clips into the last bin
  bins = np.asarray(loss_normalized.bin_index(lam))
  assert bins.tolist() == [0, 0, 24, 47]
  state = TERM.update(TERM.init(None), None, None, jnp.array([1.0, 3.0, 5.0, 8.0]), lam)
  mean = np.asarray(state["mean"])
  np.testing.assert_allclose(mean[[0, 24, 47]], [2.0, 5.0, 8.0])
  assert np.all(np.delete(mean, [0, 24, 47]) == 1.0)  # unseen bins keep the base weight
  state = TERM.update(state, None, None, jnp.array([4.0, 4.0, 5.0, 8.0]), lam)
  d = loss_normalized.DECAY
  np.testing.assert_allclose(np.asarray(state["mean"])[0], d * 2.0 + (1 - d) * 4.0,
                             rtol=1e-6)
  assert np.asarray(state["seen"])[[0, 1, 24]].tolist() == [2, 0, 2]


def test_every_noise_level_contributes_about_one_at_the_fixed_point():
  """A loss scale varying 10⁴-fold over log-SNR, each level's loss alternating between
  0.5 and 1.5 times it: after the running means settle, the normalised expected loss is
  1 at every level (one level per bin, at the bin centres)."""
  lam = jnp.asarray(-11.75 + 0.5 * np.arange(loss_normalized.NUM_BINS), jnp.float32)
  scale = jnp.exp(0.4 * lam)
  update = jax.jit(lambda st, n: TERM.update(st, None, None, scale * n, lam))
  state = TERM.init(None)
  for i in range(1500):
    state = update(state, 0.5 + (i % 2))
  expected = TERM.per_example_loss(None, state, scale, lam)
  np.testing.assert_allclose(np.asarray(expected), 1.0, rtol=0.01)


def test_it_trains_checkpoints_and_is_plotted_by_name(tmp_path):
  config = tiny_config.get_config()
  config.diffusion.weighting = "loss_normalized"
  config.train.update(num_steps=3, checkpoint_every=3, sample_every=0)
  state = train.train_and_sample(config, str(tmp_path))
  seen = np.asarray(state.objective_state["loss_normalized"]["seen"])
  assert seen.sum() >= 3  # each step's examples reached some bin
  restored = run_lib.load_checkpoint(str(tmp_path))
  for a, b in zip(jax.tree_util.tree_leaves(restored.objective_state),
                  jax.tree_util.tree_leaves(jax.device_get(state.objective_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  curve = analyses.weight_curve(run_lib.open_run(str(tmp_path)))
  assert curve["base_name"] == "debias" and len(curve["effective"]) == 1000
  assert np.all(np.isfinite(curve["effective"])) and curve["effective"] != curve["base"]
