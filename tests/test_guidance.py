"""Classifier-free guidance: the combination, the exact Gaussian case, and the wiring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_lib
from diffusion_jax import models
from diffusion_jax.sampling import samplers
from tests.gaussian_data import SHAPE
from tests.gaussian_data import STD
from tests.gaussian_data import abar_at
from tests.gaussian_data import make_diffusion

NUM_CLASSES = 2
# Class means (per channel) and the unconditional (null-class) mean; equal variances.
CLASS_MU = np.array([[0.3, -0.2, 0.1], [-0.4, 0.5, 0.0]], np.float32)
NULL_MU = np.array([0.0, 0.1, -0.1], np.float32)


def _exact_eps(diffusion):
  """ε of x0 ~ N(μ_y, diag(STD²)) for labels y, with μ_null = NULL_MU for y = NUM_CLASSES."""
  means = jnp.asarray(np.concatenate([CLASS_MU, NULL_MU[None]]))

  def fn(x, t, y):
    abar = abar_at(diffusion, t)[:, None, None, None]
    a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    mu = means[y][:, None, None, :]
    return s * (x - a * mu) / (a**2 * STD**2 + s**2)
  return fn


def test_guidance_mixes_the_target_channels_and_passes_variance_through():
  def model_fn(x, t, y):  # 2C channels: a target and a "variance" that depend on y
    target = x * 2.0 + y[:, None, None, None] * 0.5 + t[:, None, None, None] * 0.01
    return jnp.concatenate([target, -target + 1.0], axis=-1)

  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 3))
  t, y = jnp.array([5, 6, 7]), jnp.array([0, 1, 1])
  got = samplers.guided(model_fn, y, NUM_CLASSES, 3.0, channels=3)(x, t)
  cond, uncond = model_fn(x, t, y), model_fn(x, t, jnp.full_like(y, NUM_CLASSES))
  np.testing.assert_allclose(got[..., :3], uncond[..., :3] + 3.0 * (cond[..., :3] - uncond[..., :3]),
                             rtol=1e-6)
  np.testing.assert_array_equal(got[..., 3:], cond[..., 3:])
  # A guidance interval: t = 5 lies outside [5.5, 7], so its example is the conditional one.
  inside = samplers.guided(model_fn, y, NUM_CLASSES, 3.0, 3, interval=(5.5, 7.0))(x, t)
  np.testing.assert_array_equal(inside[0], cond[0])
  np.testing.assert_allclose(inside[1:], got[1:], rtol=1e-6)


@pytest.mark.parametrize("sampler,steps", [("ddim", 100), ("unipc", 20)])
@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_guided_sampling_reaches_the_analytic_guided_gaussian(sampler, steps, scale):
  """With equal class and null variances, w·score_c + (1−w)·score_u at every t is the
  score of the diffused N(μ_u + w(μ_c − μ_u), STD²): guided sampling must draw it."""
  diff = make_diffusion()
  labels = jnp.arange(SHAPE[0]) % NUM_CLASSES
  fn = samplers.guided(_exact_eps(diff), labels, NUM_CLASSES, scale, channels=3)
  x = np.asarray(jax.jit(lambda k: samplers.sample(diff, fn, SHAPE, k, sampler=sampler,
                                                     steps=steps, clip_denoised=False))(
      jax.random.PRNGKey(1)), np.float64)
  for c in range(NUM_CLASSES):
    want = NULL_MU + scale * (CLASS_MU[c] - NULL_MU)
    got = x[np.asarray(labels) == c]
    np.testing.assert_allclose(got.mean(axis=(0, 1, 2)), want, atol=0.03)
    np.testing.assert_allclose(got.std(axis=(0, 1, 2)), STD, rtol=0.1)


def _dit(config_overrides=()):
  from configs import dit_quickstart  # pylint: disable=import-outside-toplevel
  config = dit_quickstart.get_config()
  config.model.update(hidden_size=32, depth=1, num_heads=2)
  for key, value in config_overrides:
    config.model[key] = value
  model = config_lib.build_model(config)
  return config, model, config_lib.build_diffusion(config)


def test_scale_one_is_bitwise_the_unguided_sample_and_other_scales_differ(tmp_path):
  config, model, diffusion = _dit()
  params = models.init_params(model, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)  # the fresh DiT's zeroed output layer predicts 0 for any label
  m = config.model
  kwargs = dict(class_cond=True, num_classes=m.num_classes,
                image_shape=(m.image_size, m.image_size, m.in_channels), write=False)
  s = config.sample.copy_and_resolve_references()
  s.update(sampler="ddim", steps=3, num_samples=4, batch_size=4)
  plain = samplers.generate(model, diffusion, params, s, "", **kwargs)["images"]
  assert s.guidance_scale == 1.0
  s_one = s.copy_and_resolve_references()
  s_one.guidance_scale = 1
  np.testing.assert_array_equal(
      samplers.generate(model, diffusion, params, s_one, "", **kwargs)["images"], plain)
  s.guidance_scale = 4.0
  guided = samplers.generate(model, diffusion, params, s, "", **kwargs)["images"]
  assert np.abs(guided.astype(int) - plain.astype(int)).max() > 0


def test_guidance_needs_a_null_class():
  config, model, diffusion = _dit([("class_dropout_prob", 0.0)])
  config.sample.guidance_scale = 4.0
  with pytest.raises(config_lib.ConfigError, match=r"sample.guidance_scale=4.0: needs .*"
                     r"class_dropout_prob > 0"):
    config_lib.validate_config(config)
  s = config.sample.copy_and_resolve_references()
  with pytest.raises(ValueError, match="set guidance_scale=1"):
    samplers.generate(model, diffusion, {}, s, "", class_cond=True, num_classes=10,
                      image_shape=(32, 32, 1), write=False)
  with pytest.raises(ValueError, match=r"guidance_scale=-1.0: must be a finite number ≥ 0"):
    samplers.SamplerOptions(guidance_scale=-1.0).check()
  with pytest.raises(ValueError, match=r"guidance_t_min=0.5, guidance_t_max=0.2: need 0 ≤"):
    samplers.SamplerOptions(guidance_t_min=0.5, guidance_t_max=0.2).check()


def test_unet_label_dropout_uses_the_null_class_in_training_only():
  model = models.create_model(name="adm_unet", image_size=16, num_channels=32,
                              num_res_blocks=1, channel_mult="1,2", class_cond=True,
                              num_classes=10, class_dropout_prob=0.5, in_channels=1)
  params = models.init_params(model, jax.random.PRNGKey(0))
  assert params["label_emb"]["embedding"].shape[0] == 11  # the null class is row 10
  params = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(a.size), a.shape) * 0.2,
                        params)
  x, t = jnp.ones((64, 16, 16, 1)), jnp.full((64,), 10)
  y, null = jnp.zeros((64,), jnp.int32), jnp.full((64,), 10)
  eval_out = models.bind(model, params, y)(x, t)
  null_out = models.bind(model, params, null)(x, t)
  train_out = models.bind(model, params, y, train=True, dropout_key=jax.random.PRNGKey(3))(x, t)
  as_null = jnp.all(jnp.isclose(train_out, null_out), axis=(1, 2, 3))
  as_label = jnp.all(jnp.isclose(train_out, eval_out), axis=(1, 2, 3))
  assert bool(jnp.all(as_null | as_label)) and not bool(jnp.any(as_null & as_label))
  assert 16 < int(as_null.sum()) < 48  # about half dropped
  plain = models.create_model(name="adm_unet", image_size=16, num_channels=32,
                              num_res_blocks=1, channel_mult="1,2", class_cond=True,
                              num_classes=10, in_channels=1)
  assert models.init_params(plain, jax.random.PRNGKey(0))["label_emb"]["embedding"].shape[0] == 10
  with pytest.raises(ValueError, match=r"class_dropout_prob=1.0 is not in \[0, 1\)"):
    models.create_model(name="adm_unet", image_size=16, num_channels=32, num_res_blocks=1,
                        channel_mult="1,2", class_cond=True, class_dropout_prob=1.0)
