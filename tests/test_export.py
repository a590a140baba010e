"""The paper-scale train step and sampler step lower for GPU and TPU (`jax.export`), on
this CPU-only machine: anything CPU-only in them (a host callback, an op without a GPU or
TPU lowering) fails here, not on the first accelerator job."""
import jax
import jax.numpy as jnp
import pytest

from configs import celebahq256
from diffusion_jax import config_lib
from diffusion_jax import models
from diffusion_jax import state as state_lib
from diffusion_jax.sampling import samplers
from diffusion_jax.training import train

PLATFORMS = ("cuda", "tpu")


def _paper_config(dtype: str, attention: str):
  c = celebahq256.get_config()
  c.train.update(compute_dtype=dtype, attention=attention)
  return c


def _export(fn, *abstract_args):
  return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*abstract_args)


def _batch(c):
  n, s = c.data.batch_size, c.model.image_size
  return {"image": jax.ShapeDtypeStruct((n, s, s, c.model.in_channels), jnp.float32),
          "label": jax.ShapeDtypeStruct((n,), jnp.int32)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("attention", ["einsum", "fused"])
def test_the_celebahq256_train_and_sampler_steps_export_for_cuda_and_tpu(dtype, attention):
  c = _paper_config(dtype, attention)
  components, settings = config_lib.build(c), config_lib.train_settings(c)
  state = state_lib.abstract_state(components, settings)
  exported = _export(train.make_train_step(components, settings), state, _batch(c))
  assert exported.platforms == PLATFORMS
  # The state comes back with its own shapes and dtypes (fp32 params under bf16 compute).
  new_state, _ = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
  for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)
  assert {x.dtype for x in jax.tree_util.tree_leaves(new_state.params)} == {
      jnp.dtype(jnp.float32)}

  spaced = components.diffusion.respace("ddim50")

  def ddim_step(params, x, t, key):
    return samplers.ddim_sample(spaced, models.bind(components.model, params, None), x, t,
                                key)["sample"]

  batch = _batch(c)["image"]
  exported = _export(ddim_step, state.params, batch,
                     jax.ShapeDtypeStruct((batch.shape[0],), jnp.int32),
                     jax.ShapeDtypeStruct((2,), jnp.uint32))
  assert exported.platforms == PLATFORMS
  assert exported.out_avals[0].shape == batch.shape


def test_a_host_callback_in_a_step_fails_the_export():
  def step(x):
    return jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct((3,), jnp.float32), x)
  with pytest.raises(NotImplementedError, match="callback"):
    _export(step, jax.ShapeDtypeStruct((3,), jnp.float32))
