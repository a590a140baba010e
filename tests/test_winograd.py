"""Winograd's 3×3 convolution equals XLA's, forward and backward, and is used exactly where
it applies."""
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import winograd


def _direct(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


_TILINGS = {"F2x2": winograd.F2x2, "F4x4": winograd.F4x4}


@pytest.mark.parametrize("tiling", _TILINGS)
@pytest.mark.parametrize("shape", [(2, 8, 8, 3, 5), (1, 4, 12, 7, 2), (3, 16, 4, 4, 4)])
def test_forward_and_gradients_equal_the_direct_convolution_in_float64(tiling, shape):
  b, h, w, ci, co = shape
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (b, h, w, ci), jnp.float64)
    k = jax.random.normal(keys[1], (3, 3, ci, co), jnp.float64)
    dy = jax.random.normal(keys[2], (b, h, w, co), jnp.float64)
    y, vjp = jax.vjp(lambda x, k: winograd.conv3x3(x, k, _TILINGS[tiling]), x, k)
    y_ref, vjp_ref = jax.vjp(_direct, x, k)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# F(4×4, 3×3)'s transforms scale by up to 8 and 1/24: its float32 rounding is ~10× larger.
@pytest.mark.parametrize("tiling, bound", [("F2x2", 2e-6), ("F4x4", 2e-5)])
def test_float32_differences_are_rounding(tiling, bound):
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(keys[0], (4, 16, 16, 32))
  k = jax.random.normal(keys[1], (3, 3, 32, 32)) * 0.05
  dy = jax.random.normal(keys[2], (4, 16, 16, 32))
  y, vjp = jax.vjp(lambda x, k: winograd.conv3x3(x, k, _TILINGS[tiling]), x, k)
  y_ref, vjp_ref = jax.vjp(_direct, x, k)
  for got, want in zip((y, *vjp(dy)), (y_ref, *vjp_ref(dy))):
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < bound


def test_the_tiling_is_the_largest_tile_dividing_both_sides():
  assert winograd.tiling_for(32, 16) is winograd.F4x4
  assert winograd.tiling_for(4, 4) is winograd.F4x4
  assert winograd.tiling_for(6, 8) is winograd.F2x2
  assert winograd.tiling_for(2, 2) is winograd.F2x2
  assert winograd.tiling_for(8, 7) is None
  with pytest.raises(ValueError, match="divisible by its tile"):
    winograd.conv3x3(jnp.ones((1, 6, 8, 2)), jnp.ones((3, 3, 2, 2)), winograd.F4x4)


def _uses_winograd(fn, *args) -> bool:
  # A fresh function each time: traces are cached by function, not by `direct_convolutions`.
  return "name=_conv3x3" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_the_hook_takes_winograd_only_where_it_applies():
  hook = lambda x, w, strides=(1, 1), padding=((1, 1), (1, 1)): winograd.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=lax.conv_dimension_numbers(
          x.shape, w.shape, ("NHWC", "HWIO", "NHWC")))
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  assert jax.default_backend() == "cpu"
  assert _uses_winograd(hook, x, w)
  np.testing.assert_allclose(hook(x, w), _direct(x, w), rtol=1e-6)
  assert not _uses_winograd(lambda x, w: hook(x, w, strides=(2, 2)), x, w)
  assert not _uses_winograd(hook, jnp.ones((2, 7, 8, 4)), w)          # odd height
  assert not _uses_winograd(hook, x, jnp.ones((1, 1, 4, 4)))          # 1×1 kernel
  assert not _uses_winograd(lambda x, w: hook(x, w, padding=((0, 0), (0, 0))), x, w)
  assert not _uses_winograd(hook, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  with winograd.direct_convolutions():
    assert not _uses_winograd(hook, x, w)
  assert _uses_winograd(hook, x, w)


def test_the_unet_runs_its_3x3_convolutions_by_winograd_on_cpu_and_matches_direct():
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from tests import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config.get_config()
  model = config_lib.build(config).model
  m = config.model
  x = jax.random.normal(jax.random.PRNGKey(0), (2, m.image_size, m.image_size, m.in_channels))
  t = jnp.array([3, 700])
  params = model.init(jax.random.PRNGKey(1), x, t)
  params = jax.tree_util.tree_map(  # zero-initialised output convolution: make it count
      lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  apply = lambda p: model.apply(p, x, t)
  assert "name=_conv3x3" in str(jax.make_jaxpr(apply)(params))
  with winograd.direct_convolutions():
    assert "name=_conv3x3" not in str(jax.make_jaxpr(lambda p: apply(p))(params))
    want = jax.jit(lambda p: apply(p))(params)
  got = jax.jit(apply)(params)
  assert float(jnp.max(jnp.abs(got - want))) < 1e-4 * float(jnp.max(jnp.abs(want)))
