"""The training state and where it lives: TrainState, the device mesh, the shardings.

Parallelism is `jax.jit` over a Mesh with axes ('data', 'fsdp'): the global batch is
sharded over both. With train.fsdp=N (the 'fsdp' axis' size) the params, every EMA copy
and the optimizer state are sharded N ways by `state_sharding`; with N=1 (the default)
the state is replicated. Opening a finished run (`run`), converting weights (`convert`)
and training (`train`) all build the state here.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from diffusion_jax import config_lib
from diffusion_jax import models


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; all leaves are arrays (checkpointed whole).

  step: int32 scalar, steps taken. rng: uint32 (2,) base key, folded with the step.
  ema_params: one params pytree per config.optim.ema_rates entry, in that order, then one
  per config.train.posthoc_ema entry (power-function EMAs, ema.py).
  objective_state: the objective's state (objective.Objective.init): the timestep
  density's loss history and any stateful weighting's state. nonfinite_steps: int32
  count of steps whose update was dropped for a NaN/Inf loss, gradient or learning rate.
  """
  step: jax.Array
  params: Any
  ema_params: list
  opt_state: Any
  rng: jax.Array
  objective_state: dict
  nonfinite_steps: jax.Array


def make_mesh(config, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: every device of every host)."""
  devices = np.array(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1, config.train.fsdp), ("data", "fsdp"))


# Leaves smaller than this stay replicated under fsdp: biases and norm scales are a
# negligible share of the bytes, and gathering them would cost a collective each.
FSDP_MIN_ELEMENTS = 2**12


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """The PartitionSpec of one leaf: the 'fsdp' axis on its largest dimension divisible
  by `fsdp` (the first such on ties), or replicated (P()) when fsdp is 1, the leaf has
  fewer than FSDP_MIN_ELEMENTS elements or no dimension divides."""
  if fsdp == 1 or int(np.prod(shape)) < FSDP_MIN_ELEMENTS:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
  return P()


def state_sharding(mesh: Mesh, state) -> Any:
  """NamedShardings for `state` (a TrainState of arrays or ShapeDtypeStructs): params,
  ema_params and opt_state by `fsdp_spec` over the mesh's 'fsdp' axis; the step, RNG and
  objective state replicated."""
  fsdp = mesh.shape["fsdp"]
  shard = lambda tree: jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), tree)
  replicate = lambda tree: jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree)
  return state.replace(
      step=replicate(state.step), params=shard(state.params),
      ema_params=shard(state.ema_params), opt_state=shard(state.opt_state),
      rng=replicate(state.rng), objective_state=replicate(state.objective_state),
      nonfinite_steps=replicate(state.nonfinite_steps))


def state_bytes_per_device(state, shardings) -> int:
  """Bytes of `state` that one device holds under `shardings` (the largest per device)."""
  per_leaf = jax.tree_util.tree_map(
      lambda x, s: int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize,
      state, shardings)
  return int(sum(jax.tree_util.tree_leaves(per_leaf)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def init_state(components: config_lib.Components, settings: config_lib.TrainSettings,
               key) -> TrainState:
  """A fresh TrainState: params from `key`, every EMA equal to them."""
  params = models.init_params(components.model, key)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=[params for _ in settings.ema_rates + settings.posthoc_gammas],
      opt_state=components.tx.init(params),
      rng=jax.random.key_data(jax.random.PRNGKey(settings.seed)),
      objective_state=components.objective.init(key),
      nonfinite_steps=jnp.zeros((), jnp.int32))


def abstract_state(components: config_lib.Components,
                   settings: config_lib.TrainSettings) -> TrainState:
  """The TrainState's shapes and dtypes (jax.ShapeDtypeStruct leaves), nothing allocated."""
  return jax.eval_shape(lambda k: init_state(components, settings, k), jax.random.PRNGKey(0))


def create_train_state(components: config_lib.Components,
                       settings: config_lib.TrainSettings, mesh: Mesh):
  """A new TrainState created directly with its sharding (no host copy), and that
  sharding."""
  key = jax.random.PRNGKey(settings.seed)
  init = lambda k: init_state(components, settings, k)
  shardings = state_sharding(mesh, jax.eval_shape(init, key))
  return jax.jit(init, out_shardings=shardings)(key), shardings
