"""gs:// workdirs and data against a local GCS emulator (fake-gcs-server): training,
resume after SIGKILL, sampling, evaluation, prepared datasets, an emulator outage during
a checkpoint write, and multi-host preemption."""
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from diffusion_jax import checkpoints
from diffusion_jax import config_lib
from diffusion_jax import paths
from diffusion_jax import reporting
from diffusion_jax import run as run_lib
from diffusion_jax.data import image_folder
from diffusion_jax.data import input_pipeline
from diffusion_jax.evaluation import evaluate
from diffusion_jax.training import train
from tests import tiny_config
from tests.gcs_emulator import FlakyProxy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _objects(gcs, url):
  """Object names under gs://BUCKET[/PREFIX], relative to it."""
  bucket, _, prefix = url[len("gs://"):].partition("/")
  prefix = prefix + "/" if prefix else ""
  return {name[len(prefix):] for name in gcs.objects(bucket, prefix)}


@pytest.fixture(scope="module")
def gs_run(gcs, tmp_path_factory):
  """A tiny run trained in-process into a gs:// workdir, from an empty working folder."""
  cwd = tmp_path_factory.mktemp("cwd")
  workdir = gcs.create_bucket("trained") + "/tiny"
  config = tiny_config.get_config()
  config.train.update(num_steps=4, checkpoint_every=2, log_every=1)
  before = os.getcwd()
  os.chdir(cwd)
  try:
    state = train.train_and_sample(config, workdir)
  finally:
    os.chdir(before)
  return workdir, config, state, cwd


def test_training_writes_everything_into_the_bucket(gcs, gs_run):
  workdir, _, state, cwd = gs_run
  names = _objects(gcs, workdir)
  for expected in ("metrics.jsonl", "samples.png", "loss_curve.png",
                   "checkpoints/4/commit_success.txt", "checkpoints/2/commit_success.txt"):
    assert expected in names, sorted(names)
  assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
  assert any(n.startswith("compilation_cache/") for n in names)
  assert list(cwd.iterdir()) == []  # nothing local, in particular no folder named gs:
  steps = [r["step"] for r in reporting.read_metrics(workdir)]
  assert steps == [0, 1, 2, 3, 4]
  _assert_trees_equal(run_lib.load_checkpoint(workdir), state)
  assert checkpoints.checkpoint_steps(workdir) == [2, 4]


def test_sample_mode_writes_into_the_bucket(gcs, gs_run):
  workdir, config, _, _ = gs_run
  config = config.copy_and_resolve_references()
  config.sample.update(num_samples=4, batch_size=4, steps=2)
  out = run_lib.sample_from_workdir(config, workdir)
  assert out["dir"] == f"{workdir}/samples/ddim_2"
  assert {"samples/ddim_2/samples.npz", "samples/ddim_2/samples_grid.png"} <= _objects(
      gcs, workdir)
  np.testing.assert_array_equal(paths.load_npz(f"{out['dir']}/samples.npz")["arr_0"],
                                out["images"])


def _image_folder(folder, n=6):
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(folder / f"im{i}.png")
  return folder


def test_prepare_into_and_train_from_a_bucket(gcs, bucket, tmp_path):
  images = _image_folder(tmp_path / "images")
  local = image_folder.prepare_image_folder(str(images), str(tmp_path / "local"), 32)
  # From a local folder into the bucket, and from a folder in the bucket.
  image_dir = f"{bucket}/raw"
  for f in sorted(images.iterdir()):
    paths.write_bytes(f"{image_dir}/{f.name}", f.read_bytes())
  remote = image_folder.prepare_image_folder(str(images), f"{bucket}/prepared", 32)
  from_bucket = image_folder.prepare_image_folder(image_dir, f"{bucket}/prepared2", 32)
  assert local["num_records"] == remote["num_records"] == from_bucket["num_records"] == 6
  assert {"prepared/dataset.json", "prepared/images.array_record"} <= _objects(gcs, bucket)
  # ArrayRecord reads the records straight from the bucket.
  a = image_folder.PreparedFolderSource(str(tmp_path / "local"), 32)
  b = image_folder.PreparedFolderSource(f"{bucket}/prepared2", 32)
  for i in range(6):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
  config = tiny_config.get_config()
  config.data.update(dataset="folder", data_dir=f"{bucket}/prepared", batch_size=2)
  batch = next(input_pipeline.create_iterator(config.data, 0))
  assert batch["image"].shape == (2, 32, 32, 3)
  with pytest.raises(FileExistsError, match="already holds a prepared dataset"):
    image_folder.prepare_image_folder(str(images), f"{bucket}/prepared", 32)


def test_an_outage_during_a_checkpoint_write_keeps_the_last_committed_step(gcs, bucket):
  """The emulator is killed while step 2 is being written and restarted: step 1, the last
  committed checkpoint, restores exactly; the partial step is never taken for complete."""
  workdir = f"{bucket}/outage"
  config = tiny_config.get_config()
  rng = np.random.default_rng(0)
  state = {"w": rng.standard_normal((1024, 1024)).astype(np.float32)}  # 4 MB
  manager = checkpoints.create_manager(workdir, config)
  checkpoints.save(manager, 1, state, {"i": 1}, config_lib.as_json_dict(config))
  manager.wait_until_finished()
  checkpoints.save(manager, 2, {"w": state["w"] + 1}, {"i": 2},
                   config_lib.as_json_dict(config))
  gcs.stop(kill=True)
  try:
    manager.wait_until_finished()
    manager.close()
  except Exception:  # pylint: disable=broad-except
    pass  # the failed save of step 2
  finally:
    gcs.start()
  with checkpoints.create_manager(workdir, config) as fresh:
    latest = fresh.latest_step()
    assert latest in (1, 2)
    restored = fresh.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state)))
  expected = state["w"] + (latest - 1)
  np.testing.assert_array_equal(np.asarray(restored.state["w"]), expected)
  committed = _objects(gcs, workdir)
  if latest == 1:
    assert "checkpoints/2/commit_success.txt" not in committed


def _cli(workdir, *overrides):
  return [sys.executable, "-m", "diffusion_jax.main", f"--config={REPO}/tests/tiny_config.py",
          f"--workdir={workdir}", *overrides]


def _env(gcs, **extra):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  env.update(gcs.env)
  env.update(extra)
  env.pop("CLOUD_STORAGE_EMULATOR_ENDPOINT", None)  # only the two documented variables
  return env


@pytest.mark.slow
def test_gs_run_killed_after_a_checkpoint_resumes_bitwise_equal_to_a_local_run(
    gcs, bucket, tmp_path):
  args = ["--config.train.num_steps=12", "--config.train.checkpoint_every=4",
          "--cpu_devices=1"]
  env = _env(gcs)
  ref = subprocess.run(_cli(tmp_path / "local", *args), env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  workdir = f"{bucket}/killed"
  proc = subprocess.Popen(_cli(workdir, *args), env=env, cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not any(
      re.fullmatch(r"checkpoints/\d+/commit_success.txt", n) for n in _objects(gcs, workdir)):
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first = checkpoints.checkpoint_steps(workdir)
  assert first and max(first) < 12, first
  rerun = subprocess.run(_cli(workdir, *args), env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  a, b = run_lib.load_checkpoint(str(tmp_path / "local")), run_lib.load_checkpoint(workdir)
  assert int(a.step) == int(b.step) == 12
  _assert_trees_equal(a, b)
  steps = [r["step"] for r in reporting.read_metrics(workdir)]
  assert steps == sorted(set(steps)) and steps[-1] == 12
  assert not (tmp_path / "gs:").exists()


@pytest.mark.slow
def test_transient_http_errors_are_retried(gcs, gs_run, tmp_path):
  """Every 4th request to the bucket answered HTTP 503: the run still trains, checkpoints
  and ends bitwise equal to the same run without errors."""
  workdir, _, state, _ = gs_run
  bucket = gcs.create_bucket("flaky")
  proxy = FlakyProxy(gcs.url, every=4)
  try:
    env = _env(gcs, STORAGE_EMULATOR_HOST=proxy.url, TENSORSTORE_GCS_HTTP_URL=proxy.url)
    run = subprocess.run(
        _cli(f"{bucket}/run", "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
             "--config.train.log_every=1", "--cpu_devices=1"),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
  finally:
    proxy.close()
  assert run.returncode == 0, run.stderr[-3000:]
  assert proxy.failed >= 10, (proxy.requests, proxy.failed)
  _assert_trees_equal(run_lib.load_checkpoint(f"{bucket}/run"), state)
  assert checkpoints.checkpoint_steps(f"{bucket}/run") == [2, 4]


@pytest.mark.slow
def test_evaluate_writes_into_the_bucket(gcs, gs_run):
  workdir, config, _, _ = gs_run
  config = config.copy_and_resolve_references()
  config.eval.update(num_samples=8, num_reference=16, colour_num_samples=4,
                     x0_num_examples=8, x0_buckets=4, steps="2", colour_steps="2",
                     batch_size=4, samplers="ddim")
  report = evaluate.evaluate_workdir(config, workdir)
  names = _objects(gcs, workdir)
  for f in ("eval/evaluation.json", "eval/x0_error.png", "eval/fid_vs_steps.png",
            "eval/colour_stats.png", "eval/colour_strip.png"):
    assert f in names
  assert any(n.startswith("reference_digits_32px") for n in names)  # the cached statistics
  assert np.isfinite(report["fid_vs_steps"]["debias"]["ddim"][2]["fid"])


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(gcs, bucket, tmp_path):
  """A 2-process CLI job (one CPU device each): SIGTERM to process 1 alone makes both save
  one step and exit 0; rerunning both ends bitwise equal to an uninterrupted job."""
  args = ["--config.train.num_steps=24", "--config.train.checkpoint_every=1000",
          "--config.train.log_every=1", "--config.train.sample_every=0", "--cpu_devices=1"]

  def job(workdir, name):
    port = str(_free_port())
    logs = [tmp_path / f"{name}_{i}.log" for i in range(2)]
    procs = [subprocess.Popen(
        _cli(workdir, *args), cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # pylint: disable=consider-using-with
        env=_env(gcs, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i))) for i, log in enumerate(logs)]
    return procs, logs

  def finish(procs, logs):
    for p, log in zip(procs, logs):
      p.wait(timeout=600)
      assert p.returncode == 0, log.read_text()[-3000:]

  finish(*job(f"{bucket}/full", "full"))
  workdir = f"{bucket}/preempted"
  procs, logs = job(workdir, "preempted")
  deadline = time.time() + 300
  while time.time() < deadline and not re.search(r"\b([3-9]|1\d)/24\b", logs[0].read_text()):
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  finish(procs, logs)
  saved = checkpoints.checkpoint_steps(workdir)
  assert len(saved) == 1 and 3 <= saved[0] < 24, saved
  finish(*job(workdir, "resumed"))
  a, b = run_lib.load_checkpoint(f"{bucket}/full"), run_lib.load_checkpoint(workdir)
  assert int(a.step) == int(b.step) == 24
  _assert_trees_equal(a, b)


def _free_port():
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
