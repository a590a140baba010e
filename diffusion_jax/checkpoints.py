"""Orbax checkpoints of a training run: train state, data-iterator state and config.

Layout: WORKDIR/checkpoints/<step>/{state, data_iter, config, checksums}. Saves are
async; the last `train.keep_checkpoints` are kept plus every `train.keep_every`-th step.
Restores place arrays on the current mesh, so a checkpoint loads onto any device count.
An existing checkpoint is never overwritten or silently replaced by a fresh init: a
config that does not fit it is an error naming the fields.

`checksums` holds two 32-bit sums of every array of the state, computed on the devices
from the arrays being saved; a restore recomputes them, so bytes changed on disk after
the save (a flipped bit, a bad copy) are found, and the step is treated as damaged.
Steps written before checksums existed restore unchecked, and steps written before a
state field was renamed (RENAMED_STATE_FIELDS) restore into the new name.
"""
from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import sys

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax import config_lib
from diffusion_jax import paths

ITEMS = ("state", "data_iter", "config", "checksums")

# TrainState fields renamed since checkpoints were first written: {new: old name}.
RENAMED_STATE_FIELDS = {"objective_state": "sampler_state"}


class NoCheckpointError(FileNotFoundError):
  """The workdir has no checkpoint (or not the step asked for)."""


class CheckpointConfigError(ValueError):
  """The workdir's checkpoint was written under a config this run cannot continue."""


class CheckpointSaveError(RuntimeError):
  """An async checkpoint save failed (disk full, permission, bucket); says which step."""


def _save_cause(e: BaseException) -> str:
  """One line on why a save failed."""
  text = f"{type(e).__name__}: {e}"
  low = text.lower()
  for keys, cause in ((("resource_exhausted", "no space", "file too large", "quota"),
                       "no space left (disk full or quota)"),
                      (("permission", "403", "401"), "permission denied"),
                      (("not_found", "404", "no such"), "the folder or bucket is gone")):
    if any(k in low for k in keys):
      return f"{cause} ({text.splitlines()[0][:200]})"
  return text.splitlines()[0][:300]


class SaveWatcher:
  """Notices a failed async save at the next step boundary instead of the next save.

  `save` starts an async save and a daemon thread that waits for Orbax to finish it and
  keeps a failure; `raise_if_failed()` (a cheap attribute check, called between steps)
  turns that into one CheckpointSaveError naming the step and the cause.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._watched = -1
    self.failure: tuple[int, BaseException] | None = None

  def _failed(self, step: int, e: BaseException) -> None:
    """Keeps the failure of `step`'s save, unless `step` committed and only the removal
    of old checkpoints (Orbax's garbage collection, after the commit) failed: that is a
    warning, and the old checkpoints stay."""
    if paths.exists(self._manager.directory / str(step) / "commit_success.txt"):
      message = (f"Checkpoint step {step} is saved, but removing older checkpoints from "
                 f"{self._manager.directory} failed ({_save_cause(e)}); they are kept. "
                 "Remove what is not a checkpoint from that folder (links, other files).")
      logging.warning(message)
      print(message, file=sys.stderr, flush=True)
      return
    self.failure = self.failure or (step, e)

  def save(self, step: int, state, iter_state: dict, config_json: dict) -> None:
    """`save` (below), then watch it; a failure of the previous save raises here too."""
    for _ in range(2):  # again once when an earlier save's clean-up failure was raised
      try:
        save(self._manager, step, state, iter_state, config_json)
        break
      except Exception as e:  # pylint: disable=broad-except
        # Orbax re-raises a failed earlier save here; else this step's save failed.
        earlier = self._watched if 0 <= self._watched != step else step
        self._failed(earlier, e)
        if self.failure is not None or earlier == step:
          break
    self.raise_if_failed()
    self._watch(step)

  def _watch(self, step: int) -> None:
    import threading  # pylint: disable=import-outside-toplevel
    self._watched = step

    def wait():
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        self._failed(step, e)

    threading.Thread(target=wait, daemon=True, name=f"save-watch-{step}").start()

  def finish(self) -> None:
    """Waits for the last save; raises CheckpointSaveError if any save failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(self._watched, e)
    self.raise_if_failed()

  def raise_if_failed(self) -> None:
    if self.failure is not None:
      step, e = self.failure
      committed = [int(p.name) for p in self._manager.directory.iterdir()
                   if p.name.isdigit() and int(p.name) != step
                   and paths.exists(p / "commit_success.txt")]
      raise CheckpointSaveError(
          f"Saving checkpoint step {step} to {self._manager.directory} failed: "
          f"{_save_cause(e)}. The last committed checkpoint "
          f"({'step ' + str(max(committed)) if committed else 'none yet'}) is intact; "
          "fix the cause, then rerun the same command to resume.")


def quiet_library_errors(record) -> bool:
  """A logging filter (the CLI's, unless --verbosity): False (drop) for the error
  records of Orbax, TensorStore and the asyncio loop they write from. A full disk makes
  them log hundreds of tracebacks from their threads; SaveWatcher reports it in one line."""
  path = record.pathname.replace(os.sep, "/")
  return not (record.levelno >= std_logging.ERROR and
              any(f"/{lib}/" in path for lib in ("orbax", "tensorstore", "asyncio")))


def quiet_closed_loop_callbacks(default_hook):
  """A sys.unraisablehook (the CLI's, unless --verbosity) that drops the "Event loop is
  closed" errors of TensorStore writes finishing after a failed save closed Orbax's loop
  (hundreds of bare tracebacks, interleaved with the run's one-line report), and passes
  everything else to `default_hook`."""
  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      default_hook(unraisable)
  return hook


def checkpoint_dir(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints (absolute when local; gs:// kept)."""
  return paths.path(workdir) / "checkpoints"


def _set_aside_foreign_steps(directory: epath.Path) -> None:
  """Moves entries named like steps that are not folders (links, files) to
  checkpoints/foreign/: Orbax would count them as steps, and removing them as old
  checkpoints fails (or would delete what a link points to)."""
  if paths.is_remote(directory) or not os.path.isdir(directory):
    return  # object stores have no links
  for name in sorted(os.listdir(directory)):
    entry = os.path.join(directory, name)
    if name.isdigit() and (os.path.islink(entry) or not os.path.isdir(entry)):
      target = directory / "foreign" / name
      paths.move(entry, target)
      message = (f"{entry} is a link or a file, not a checkpoint folder; moved it to "
                 f"{target} (nothing it points to was touched).")
      logging.warning(message)
      print(message, file=sys.stderr, flush=True)


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  _set_aside_foreign_steps(checkpoint_dir(workdir))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints,
      keep_period=config.train.keep_every or None,
      enable_async_checkpointing=True,
      create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def _as_words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (one per element; 8-byte elements give two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype.itemsize in (4, 8):  # 8-byte elements become (..., 2)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_sums(x: jax.Array) -> jax.Array:
  """(2,) uint32: Σ words and Σ words·(2·index+1), both mod 2^32.

  Any change of one word changes both (odd factors are invertible mod 2^32); the index
  is built from per-axis iotas, so a sharded array is summed where it lies.
  """
  words = _as_words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
        stride % 2**32)
    stride *= words.shape[axis]
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda tree: jax.tree_util.tree_map(_leaf_sums, tree))


def checksums(state) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} of every array of `state` (a host sync)."""
  sums = jax.device_get(_tree_sums(state))
  flat, _ = jax.tree_util.tree_flatten_with_path(sums)
  return {jax.tree_util.keystr(path): [int(v) for v in value] for path, value in flat}


def save(manager: ocp.CheckpointManager, step: int, state, iter_state: dict,
         config_json: dict) -> None:
  """Starts an async save of `step` with its checksums and the config (its JSON dict,
  config_lib.Training.config_json); a no-op if that step is already saved."""
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iter=ocp.args.JsonSave(iter_state),
      config=ocp.args.JsonSave(config_json),
      checksums=ocp.args.JsonSave({"format": 1, "sums": checksums(state)})))


def _old_names(manager: ocp.CheckpointManager, step: int) -> dict[str, str]:
  """{field: the older name `step` stores it under} for renamed fields it predates."""
  try:
    stored = set(ocp.StandardCheckpointHandler().metadata(
        manager.directory / str(step) / "state").keys())
  except Exception:  # pylint: disable=broad-except
    return {}  # unreadable metadata: the restore itself reports the step as damaged
  return {new: old for new, old in RENAMED_STATE_FIELDS.items()
          if new not in stored and old in stored}


def _restore_with_state(manager: ocp.CheckpointManager, step: int, target, **items):
  """(TrainState, the other restored items) of `step`, `target` giving the state's
  structure (ShapeDtypeStruct leaves), whatever names of RENAMED_STATE_FIELDS it uses."""
  old = _old_names(manager, step)
  fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
  stored_target = {old.get(k, k): v for k, v in fields.items()} if old else target
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(stored_target), **items))
  state = restored.state
  if old:
    new_name = {v: k for k, v in old.items()}
    state = target.replace(**{new_name.get(k, k): v for k, v in state.items()})
  return state, restored


def damaged_arrays(manager: ocp.CheckpointManager, step: int, state) -> str | None:
  """Why the restored `state` of `step` differs from what was saved (the first few
  arrays whose checksums differ), or None when it matches or the step has no checksums."""
  if not (manager.directory / str(step) / "checksums").exists():
    return None  # written before checksums existed
  saved = manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))
  saved = (saved.checksums or {}).get("sums", {})
  for new, old in _old_names(manager, step).items():
    saved = {(f".{new}" + k[len(old) + 1:] if k.startswith(f".{old}") else k): v
             for k, v in saved.items()}
  now = checksums(state)
  differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if not differ:
    return None
  return (f"{len(differ)} of {len(now)} arrays differ from the checksums written with them "
          f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}); the files were "
          "changed or damaged after saving")


def _abstract_with_shardings(state, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class _Unreadable(Exception):
  """A checkpoint step whose files cannot be restored (the message says why)."""


def restore_latest(manager: ocp.CheckpointManager, state, shardings, config_json: dict):
  """(state, data-iterator state, objective changes) of the newest checkpoint that
  restores (or of train.resume_step), or None when the workdir has none.

  A step that cannot be read (missing or truncated files, an incomplete folder) is
  reported in one line; when an older step restores, the damaged newer ones are moved
  to checkpoints/damaged/<step> (never deleted) and training continues from the older
  one. Raises CheckpointConfigError if the saved config's model, diffusion or EMA
  fields differ from `config_json` (the current config's JSON dict), if the objective
  (weighting, loss, timestep sampler) differs without train.allow_objective_change, or
  if no step restores. The objective changes are "field: checkpoint …, config …" lines.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  wanted = config_json["train"]["resume_step"]
  if wanted >= 0:
    if wanted not in steps:
      raise CheckpointConfigError(f"train.resume_step={wanted} is not saved in "
                                  f"{manager.directory}; saved steps: {sorted(steps)}.")
    steps = [wanted]
  failures = []
  for step in steps:
    try:
      result = _restore_step(manager, step, state, shardings, config_json)
    except _Unreadable as e:
      failures.append((step, str(e)))
      logging.warning("Checkpoint step %d cannot be restored: %s", step, e)
      continue
    for bad, reason in failures:
      _move_aside(manager, bad, reason)
    if failures:
      manager.reload()
    return result
  if not failures:
    return None
  step, reason = failures[0]
  raise CheckpointConfigError(
      f"No checkpoint in {manager.directory} can be restored (steps {sorted(steps)}); the "
      f"latest, step {step}: {reason}. If the code or config changed, use the ones it was "
      "saved with, or a new --workdir. Nothing was moved or deleted.")


def _move_aside(manager, step: int, reason: str) -> None:
  src = manager.directory / str(step)
  dst = manager.directory / "damaged" / str(step)
  message = (f"Checkpoint step {step} is damaged ({reason}); resuming from an older step. "
             f"Moved it to {dst}.")
  paths.move(src, dst)
  logging.warning(message)
  print(message, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _restore_step(manager, step: int, state, shardings, config_json: dict):
  where = os.fspath(manager.directory / str(step))
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(f"its config cannot be read ({_one_line(e)})") from None
  diffs, changes = config_lib.saved_differences(saved.config, config_json)
  if diffs:
    raise CheckpointConfigError(
        f"The checkpoint at {where} was trained with a different configuration:\n  "
        + "\n  ".join(diffs) + "\nUse a new --workdir, or set these fields as in the "
        "checkpoint. The checkpoint was left untouched.")
  if changes and not config_json["train"]["allow_objective_change"]:
    raise CheckpointConfigError(
        f"The checkpoint at {where} was trained under another objective:\n  "
        + "\n  ".join(changes) + "\nSet these fields as in the checkpoint, or pass "
        "--config.train.allow_objective_change=True to continue under the new objective "
        "on purpose. The checkpoint was left untouched.")
  try:
    restored_state, restored = _restore_with_state(
        manager, step, _abstract_with_shardings(state, shardings),
        data_iter=ocp.args.JsonRestore())
    damage = damaged_arrays(manager, step, restored_state)
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(f"its train state cannot be read ({_one_line(e)})") from None
  if damage:
    raise _Unreadable(damage)
  if changes:
    logging.warning("Objective changed at step %d (allow_objective_change): %s", step,
                    "; ".join(changes))
  return restored_state, restored.data_iter, changes


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
  path = checkpoint_dir(workdir)
  if not paths.isdir(path):
    raise NoCheckpointError(f"No checkpoints in {workdir} (expected {path}). Train first "
                            "(--mode=train), or check --workdir.")
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
    raise NoCheckpointError(f"No checkpoint{'' if step is None else f' at step {step}'} "
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
  model (or other checkpoint-defining) fields differ from `config`'s, except those that
  shape only the train state (config_lib.STATE_ONLY_FIELDS)."""
  saved = saved_config(workdir)
  mismatch = [line for line in config_lib.saved_differences(
      config_lib.as_json_dict(saved), config).model
              if not line.startswith(tuple(f + ":" for f in config_lib.STATE_ONLY_FIELDS))]
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
    restored, _ = _restore_with_state(manager, step, target)
    damage = damaged_arrays(manager, step, restored)
  if damage:
    raise CheckpointConfigError(
        f"Checkpoint step {step} in {workdir} is damaged: {damage}. Resume training on "
        "the workdir (--mode=train) to set it aside and continue from the newest good "
        "step, or restore the files from a copy.")
  return restored
