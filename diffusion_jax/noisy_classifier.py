"""The noisy classifier of a run (classifier guidance): built from config.classifier,
checkpointed in WORKDIR/classifier/ by `training.classifier_train`, loaded here for
sampling (`run.sample_from_workdir`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from diffusion_jax import paths
from diffusion_jax.models import classifier as classifier_lib

CHECKPOINTS = "classifier"


def build(config):
  """The classifier config.classifier describes, for config.data and config.model."""
  c, m = config.classifier, config.model
  return classifier_lib.create(
      config.data.image_size, width=c.width, depth=c.depth,
      attention_resolutions=c.attention_resolutions, channel_mult=c.channel_mult,
      num_head_channels=c.num_head_channels, pool=c.pool,
      use_scale_shift_norm=c.use_scale_shift_norm, resblock_updown=c.resblock_updown,
      num_classes=m.num_classes, in_channels=m.in_channels)


def manager(workdir) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      paths.path(workdir) / CHECKPOINTS, item_names=("state", "data_iter"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False))


def load_params(config, workdir):
  """(classifier model, params, step) of WORKDIR/classifier's latest checkpoint."""
  model = build(config)
  folder = paths.path(workdir) / CHECKPOINTS
  mgr = manager(workdir) if paths.isdir(folder) else None
  step = mgr.latest_step() if mgr is not None else None
  if step is None:
    raise FileNotFoundError(
        f"No noisy classifier in {paths.path(workdir) / CHECKPOINTS}: run --mode="
        "train_classifier first (or set sample.classifier_scale=0).")
  abstract = jax.eval_shape(lambda k: init_state(model, optimizer(config), k),
                            jax.random.PRNGKey(0))
  state = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  mgr.close()
  return model, state["params"], step


def optimizer(config):
  c = config.classifier
  return optax.adamw(c.lr, weight_decay=c.weight_decay)


def init_state(model, tx, key) -> dict:
  params = classifier_lib.init_params(model, key)
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
