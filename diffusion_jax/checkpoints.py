"""Orbax checkpoints of a training run: train state, data-iterator state and config.

Layout: WORKDIR/checkpoints/<step>/{state, data_iter, config}. Saves are async; the
last `train.keep_checkpoints` are kept plus every `train.keep_every`-th step. Restores
place arrays on the current mesh, so a checkpoint loads onto any device count. An
existing checkpoint is never overwritten or silently replaced by a fresh init: a
config that does not fit it is an error naming the fields.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from diffusion_jax import config_lib
from diffusion_jax import paths

ITEMS = ("state", "data_iter", "config")


class CheckpointConfigError(ValueError):
  """The workdir's checkpoint was written under a config this run cannot continue."""


def checkpoint_dir(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints (absolute when local; gs:// kept)."""
  return paths.path(workdir) / "checkpoints"


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints,
      keep_period=config.train.keep_every or None,
      enable_async_checkpointing=True,
      create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state, iter_state: dict, config) -> None:
  """Starts an async save of `step` (a no-op if that step is already saved)."""
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iter=ocp.args.JsonSave(iter_state),
      config=ocp.args.JsonSave(json.loads(config_lib.to_json(config)))))


def _abstract_with_shardings(state, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore_latest(manager: ocp.CheckpointManager, state, shardings, config):
  """(state, data-iterator state, objective changes) of the latest checkpoint, or None
  when there is none.

  Raises CheckpointConfigError if the saved config's model, diffusion or EMA fields
  differ from `config`, if the objective (weighting, loss, timestep sampler) differs
  without train.allow_objective_change, or if the saved arrays do not fit this run's
  state. The objective changes are "field: checkpoint …, config …" lines.
  """
  step = manager.latest_step()
  if step is None:
    return None
  where = os.fspath(manager.directory / str(step))
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  diffs = config_lib.model_mismatches(saved.config, config)
  if diffs:
    raise CheckpointConfigError(
        f"The checkpoint at {where} was trained with a different configuration:\n  "
        + "\n  ".join(diffs) + "\nUse a new --workdir, or set these fields as in the "
        "checkpoint. The checkpoint was left untouched.")
  changes = config_lib.objective_changes(saved.config, config)
  if changes and not config.train.allow_objective_change:
    raise CheckpointConfigError(
        f"The checkpoint at {where} was trained under another objective:\n  "
        + "\n  ".join(changes) + "\nSet these fields as in the checkpoint, or pass "
        "--config.train.allow_objective_change=True to continue under the new objective "
        "on purpose. The checkpoint was left untouched.")
  if changes:
    logging.warning("Objective changed at step %d (allow_objective_change): %s", step,
                    "; ".join(changes))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract_with_shardings(state, shardings)),
        data_iter=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointConfigError(
        f"The checkpoint at {where} does not fit this run's train state ({e}). Use a new "
        "--workdir or the config it was saved with; it was left untouched.") from None
  return restored.state, restored.data_iter, changes


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
  path = checkpoint_dir(workdir)
  if not paths.isdir(path):
    raise FileNotFoundError(f"No checkpoints in {workdir} (expected {path}).")
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False),
                               item_names=ITEMS)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps saved in `workdir` (empty when it has no checkpoints)."""
  if not paths.isdir(checkpoint_dir(workdir)):
    return []
  with _read_only_manager(workdir) as manager:
    return sorted(manager.all_steps())


def _resolve_step(manager, step, workdir):
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"No checkpoint{'' if step is None else f' at step {step}'} "
                            f"in {workdir}; found steps {list(manager.all_steps())}.")
  return step


def saved_config(workdir: str, step: int | None = None):
  """The ConfigDict stored with a checkpoint (latest by default)."""
  with _read_only_manager(workdir) as manager:
    step = _resolve_step(manager, step, workdir)
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return config_lib.from_json(json.dumps(saved.config))


def saved_config_matching(workdir: str, config):
  """The config saved with `workdir`'s latest checkpoint; CheckpointConfigError when its
  model (or other checkpoint-defining) fields differ from `config`'s."""
  saved = saved_config(workdir)
  mismatch = config_lib.model_mismatches(json.loads(config_lib.to_json(saved)), config)
  if mismatch:
    raise CheckpointConfigError(
        f"The checkpoint in {workdir} was trained with a different configuration:\n  "
        + "\n  ".join(mismatch))
  return saved


def restore_state(workdir: str, abstract_state, step: int | None = None):
  """The saved train state, on the first local device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)
  with _read_only_manager(workdir) as manager:
    step = _resolve_step(manager, step, workdir)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  return restored.state
