"""Checkpoints: damaged steps are set aside and an older one resumes; the fields that
decide whether a checkpoint fits a config."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffusion_jax import checkpoints
from diffusion_jax import config_lib
from diffusion_jax import paths
from diffusion_jax.training import train
from tests import tiny_config


def _assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _truncate_state_files(step_dir):
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      with open(f, "r+b") as handle:
        handle.truncate(10)


def _flip_two_bytes(step_dir):
  """XORs two bytes in the middle of the largest array file: it still restores, to other
  values, unless the checksums catch it."""
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  largest = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 0x40
  data[len(data) // 2 + 1001] ^= 0x01
  largest.write_bytes(bytes(data))


_DAMAGE = {
    "two bytes flipped in an array file": _flip_two_bytes,
    "_METADATA deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "array data truncated": _truncate_state_files,
    "step folder empty": lambda d: [p.unlink() for p in sorted(d.rglob("*"), reverse=True)
                                    if p.is_file()],
}


@pytest.mark.slow  # five tiny training runs (~90 s)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, capfd):
  config = tiny_config.get_config()
  config.train.update(num_steps=6, checkpoint_every=2, log_every=2)
  reference = train.train_and_sample(config, str(tmp_path / "ref"))
  for i, (name, damage) in enumerate(_DAMAGE.items()):
    workdir = tmp_path / f"run{i}"
    config.train.num_steps = 4
    train.train_and_sample(config, str(workdir))
    damage(workdir / "checkpoints" / "4")
    config.train.num_steps = 6
    capfd.readouterr()
    state = train.train_and_sample(config, str(workdir))
    err = capfd.readouterr().err
    assert "Checkpoint step 4 is damaged" in err and "resuming from an older step" in err, name
    _assert_trees_equal(state, reference)
    assert (workdir / "checkpoints" / "damaged" / "4").is_dir(), name  # kept, not deleted
    assert checkpoints.checkpoint_steps(str(workdir)) == [2, 4, 6], name
  # An explicit step, and a workdir where nothing restores: errors, nothing moved.
  config.train.resume_step = 3
  with pytest.raises(checkpoints.CheckpointConfigError, match="resume_step=3 is not saved"):
    train.train_and_sample(config, str(workdir))
  config.train.resume_step = -1
  for step in (2, 4, 6):
    (workdir / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  with pytest.raises(checkpoints.CheckpointConfigError, match="No checkpoint .* can be restored"):
    train.train_and_sample(config, str(workdir))
  assert checkpoints.checkpoint_steps(str(workdir)) == [2, 4, 6]



def test_checksums_find_one_changed_word_in_any_array(tmp_path):
  state = {"w": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
           "h": np.ones((5,), jnp.bfloat16), "step": np.int32(7),
           "key": jax.random.key_data(jax.random.PRNGKey(3))}
  sums = checkpoints.checksums(state)
  assert set(sums) == {"['h']", "['key']", "['step']", "['w']"}
  assert sums == checkpoints.checksums(jax.tree_util.tree_map(np.copy, state))
  changed = dict(state, w=state["w"].copy())
  changed["w"].view(np.uint32)[1, 2, 3] ^= 1 << 7
  assert [k for k in sums if sums[k] != checkpoints.checksums(changed)[k]] == ["['w']"]
  swapped = dict(state, h=state["h"][::-1].copy())
  swapped["h"][0] = 2
  assert checkpoints.checksums(swapped)["['h']"] != sums["['h']"]
  # Saved with the step; a restore of other values is reported, naming the array.
  config = tiny_config.get_config()
  with checkpoints.create_manager(str(tmp_path), config) as manager:
    checkpoints.save(manager, 1, state, {}, config_lib.as_json_dict(config))
    manager.wait_until_finished()
    assert checkpoints.damaged_arrays(manager, 1, state) is None
    assert "['w']" in checkpoints.damaged_arrays(manager, 1, changed)
    # A step written before checksums existed has no such item: it restores unchecked.
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data_iter=ocp.args.JsonSave({}),
                                            config=ocp.args.JsonSave(config.to_dict())))
    manager.wait_until_finished()
    assert checkpoints.damaged_arrays(manager, 2, changed) is None


def test_model_and_objective_differences_are_named():
  config = tiny_config.get_config()
  saved = config.to_dict()
  other = tiny_config.get_config()
  other.model.num_channels = 64
  other.optim.ema_rates = (0.5,)
  assert config_lib.saved_differences(saved, other) == ([
      "model.num_channels: checkpoint 32, config 64",
      "optim.ema_rates: checkpoint [0.99, 0.9], config [0.5]"], [])
  other = tiny_config.get_config()
  other.diffusion.weighting = "p2"
  other.optim.lr = 1.0  # not a checkpoint-defining field
  assert config_lib.saved_differences(saved, config_lib.as_json_dict(other)) == ([], [
      "diffusion.weighting: checkpoint 'debias', config 'p2'"])


def test_a_step_that_is_a_link_or_a_file_is_set_aside_before_orbax_sees_it(tmp_path):
  """Orbax counted a linked step as a checkpoint, and its clean-up then failed
  ("Cannot call rmtree on a symbolic link"), which failed the save and the run."""
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "keep.txt").write_text("mine")
  ck = tmp_path / "wd" / "checkpoints"
  ck.mkdir(parents=True)
  (ck / "1").symlink_to(elsewhere)
  (ck / "3").write_text("not a folder")
  (ck / "junk").mkdir()
  config = tiny_config.get_config()
  config.train.keep_checkpoints = 1
  state = {"w": np.ones(3, np.float32)}
  with checkpoints.create_manager(str(tmp_path / "wd"), config) as manager:
    for step in (4, 5):
      checkpoints.save(manager, step, state, {}, config_lib.as_json_dict(config))
      manager.wait_until_finished()
  assert sorted(p.name for p in ck.iterdir()) == ["5", "foreign", "junk"]
  assert (ck / "foreign" / "1").is_symlink() and (ck / "foreign" / "3").is_file()
  assert (elsewhere / "keep.txt").read_text() == "mine"


class _Manager:
  def __init__(self, directory):
    self.directory = directory


def test_a_failed_clean_up_after_a_committed_save_is_a_warning_not_a_failed_save(
    tmp_path, capfd):
  directory = paths.path(tmp_path)
  for step in (4, 8):
    (tmp_path / str(step)).mkdir()
    (tmp_path / str(step) / "commit_success.txt").write_text("ok")
  (tmp_path / "12").mkdir()  # not committed
  watcher = checkpoints.SaveWatcher(_Manager(directory))
  watcher._failed(8, OSError("Cannot call rmtree on a symbolic link"))
  assert watcher.failure is None
  assert "Checkpoint step 8 is saved, but removing older checkpoints" in capfd.readouterr().err
  watcher._failed(12, OSError("[Errno 28] No space left on device"))
  with pytest.raises(checkpoints.CheckpointSaveError,
                     match=r"step 12 .*no space left .*checkpoint \(step 8\) is intact"):
    watcher.raise_if_failed()


def test_library_error_logs_are_dropped_unless_verbose():
  import logging  # pylint: disable=import-outside-toplevel
  record = lambda level, path: logging.LogRecord("absl", level, path, 1, "x", None, None)
  orbax = "/site-packages/orbax/checkpoint/_src/checkpoint_manager.py"
  assert not checkpoints.quiet_library_errors(record(logging.ERROR, orbax))
  assert checkpoints.quiet_library_errors(record(logging.WARNING, orbax))
  assert checkpoints.quiet_library_errors(record(logging.ERROR, "/repo/diffusion_jax/training/train.py"))


def test_a_checkpoint_from_before_the_objective_state_was_renamed_resumes_bitwise(tmp_path):
  """Checkpoints written while TrainState called the objective's state `sampler_state`
  load and resume exactly as the same step saved today."""
  import flax  # pylint: disable=import-outside-toplevel

  from diffusion_jax import run as run_lib  # pylint: disable=import-outside-toplevel

  @flax.struct.dataclass
  class OldTrainState:  # the TrainState's layout before the rename
    step: jax.Array
    params: dict
    ema_params: list
    opt_state: tuple
    rng: jax.Array
    sampler_state: dict
    nonfinite_steps: jax.Array

  config = tiny_config.get_config()
  config.diffusion.timestep_sampler = "loss-second-moment"  # a state that changes
  config.train.update(num_steps=2, checkpoint_every=2, log_every=1, sample_every=0)
  now, old = tmp_path / "now", tmp_path / "old"
  train.train_and_sample(config, str(now))
  state = run_lib.load_checkpoint(str(now))
  assert int(np.asarray(state.objective_state["loss_counts"]).sum()) > 0
  with ocp.CheckpointManager(checkpoints.checkpoint_dir(str(now)),
                             item_names=checkpoints.ITEMS) as manager:
    iter_state = manager.restore(2, args=ocp.args.Composite(
        data_iter=ocp.args.JsonRestore())).data_iter
  fields = {k: getattr(state, k) for k in ("step", "params", "ema_params", "opt_state", "rng",
                                           "nonfinite_steps")}
  manager = checkpoints.create_manager(str(old), config)
  checkpoints.save(manager, 2, OldTrainState(sampler_state=state.objective_state, **fields),
                   iter_state, config_lib.as_json_dict(config))
  manager.wait_until_finished()
  manager.close()
  _assert_trees_equal(run_lib.load_checkpoint(str(old)), state)
  config.train.num_steps = 3
  _assert_trees_equal(train.train_and_sample(config, str(old)),
                      train.train_and_sample(config, str(now)))
