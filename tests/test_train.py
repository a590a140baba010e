"""The training path: the step, data parallelism, checkpoints, resume, bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import checkpoints
from diffusion_jax import config_lib
from diffusion_jax import paths
from diffusion_jax import reporting
from diffusion_jax import run as run_lib
from diffusion_jax import state as state_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.data import sources
from diffusion_jax.training import train
from tests import process_kill
from tests import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices=1):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _build(config):
  return config_lib.build(config)


def _parts(config):
  """What the step is made of: (components, settings)."""
  return config_lib.build(config), config_lib.train_settings(config)


def _fixed_batch(config, seed=0):
  it = input_pipeline.create_iterator(config.data, seed)
  return {k: jnp.asarray(v) for k, v in next(it).items()}


def _assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_one_step_lowers_the_loss_on_a_fixed_batch():
  config = tiny_config.get_config()
  config.diffusion.var_type = "fixed_small"
  config.model.learn_sigma = False
  components = _build(config)
  model, objective = components.model, components.objective
  mesh = state_lib.make_mesh(config)
  state, _ = state_lib.create_train_state(*_parts(config), mesh)
  batch = _fixed_batch(config)
  t = jnp.array([50, 200, 400, 600, 800, 950, 100, 700])
  noise = jax.random.normal(jax.random.PRNGKey(3), batch["image"].shape)

  @jax.jit
  def eval_loss(params):
    fn = lambda x, tt: model.apply({"params": params}, x, tt)
    return objective.loss(fn, None, state.objective_state, batch["image"], t,
                          jnp.ones(t.shape), noise)[0]

  before = float(eval_loss(state.params))
  step = jax.jit(train.make_train_step(*_parts(config)))
  for _ in range(3):
    state, metrics = step(state, batch)
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
  assert float(eval_loss(state.params)) < before


def test_weighting_reaches_the_loss():
  """constant and debias give different gradients; the logged loss is the formula."""
  base = tiny_config.get_config()
  base.diffusion.update(var_type="fixed_small", loss_type="mse")
  base.model.learn_sigma = False
  batch = _fixed_batch(base)
  grads, logged = {}, {}
  for name in ("constant", "debias"):
    config = tiny_config.get_config()
    config.diffusion.update(var_type="fixed_small", loss_type="mse", weighting=name)
    config.model.learn_sigma = False
    model, diffusion = _build(config)[:2]
    state, _ = state_lib.create_train_state(*_parts(config), state_lib.make_mesh(config))
    params0 = state.params
    new_state, metrics = jax.jit(train.make_train_step(*_parts(config)))(state, batch)
    grads[name] = jax.tree_util.tree_map(lambda a, b: a - b, new_state.params, params0)
    logged[name] = float(metrics["loss"])
    # Recompute the step's loss from its definition: the same t and noise from the key.
    key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 0)
    k_t, k_noise, _ = jax.random.split(key, 3)
    t = np.asarray(jax.random.randint(k_t, (8,), 0, 1000, dtype=jnp.int32))
    noise = jax.random.normal(k_noise, batch["image"].shape)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    x_t = (np.sqrt(abar[t])[:, None, None, None] * np.asarray(batch["image"])
           + np.sqrt(1 - abar[t])[:, None, None, None] * np.asarray(noise))
    eps = np.asarray(model.apply({"params": params0}, jnp.asarray(x_t, jnp.float32),
                                 jnp.asarray(t)))
    mse = ((eps - np.asarray(noise)) ** 2).mean(axis=(1, 2, 3))
    w = np.ones(8) if name == "constant" else np.sqrt((1 - abar[t]) / abar[t])
    assert logged[name] == pytest.approx(float(np.mean(w * mse)), rel=1e-4)
  diff = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(
      lambda a, b: a - b, grads["constant"], grads["debias"]))[0]
  assert float(jnp.max(jnp.abs(diff))) > 0


def test_gradient_accumulation_and_bf16():
  """Two micro-batches give the one-batch update; bf16 compute trains with fp32 params."""
  results = {}
  for name, accum, dtype in (("base", 1, "float32"), ("accum", 2, "float32"),
                             ("bf16", 1, "bfloat16")):
    config = tiny_config.get_config()
    config.optim.update(grad_accum_steps=accum, eps=1e-3)
    config.train.compute_dtype = dtype
    model, diffusion = _build(config)[:2]
    state, _ = state_lib.create_train_state(*_parts(config), state_lib.make_mesh(config))
    p0 = jax.flatten_util.ravel_pytree(state.params)[0]
    state, metrics = jax.jit(train.make_train_step(*_parts(config)))(
        state, _fixed_batch(config))
    flat = jax.flatten_util.ravel_pytree(state.params)[0]
    assert flat.dtype == jnp.float32
    results[name] = (float(metrics["loss"]), flat - p0)
  np.testing.assert_allclose(results["accum"][0], results["base"][0], rtol=1e-5)
  base_update = results["base"][1]
  for name, tol in (("accum", 1e-4), ("bf16", 0.1)):
    rel = float(jnp.linalg.norm(results[name][1] - base_update) / jnp.linalg.norm(base_update))
    assert rel < tol, (name, rel)
  assert results["bf16"][0] == pytest.approx(results["base"][0], rel=0.05)


def test_save_restore_is_exact(tmp_path):
  config = tiny_config.get_config()
  state = train.train_and_sample(config, str(tmp_path))
  assert int(state.step) == config.train.num_steps
  _assert_trees_equal(run_lib.load_checkpoint(str(tmp_path)), jax.device_get(state))
  for name in ("samples.png", "loss_curve.png", "metrics.jsonl"):
    assert (tmp_path / name).exists()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in rows if "loss" in r]
  assert [r["step"] for r in logged] == [2, 4, 6]
  for key in ("mse", "vb", "grad_norm", "lr", "images_per_s", "loss_q0"):
    assert key in logged[-1]
  # --mode=sample on the workdir: evaluator-ready npz, grid, individual PNGs.
  config.sample.update(num_samples=5, batch_size=2, save_individual=True, sampler="unipc")
  out = run_lib.sample_from_workdir(config, str(tmp_path))
  with np.load(tmp_path / "samples" / "unipc_3" / "samples.npz") as z:
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 32, 32, 1)
    np.testing.assert_array_equal(z["arr_0"], out["images"])
  assert len(list((tmp_path / "samples" / "unipc_3" / "images").iterdir())) == 5
  again = run_lib.sample_from_workdir(config, str(tmp_path))
  np.testing.assert_array_equal(again["images"], out["images"])


def test_resume_continues_and_refuses_a_different_model(tmp_path):
  config = tiny_config.get_config()
  config.train.num_steps = 3
  train.train_and_sample(config, str(tmp_path))
  saved = sorted(os.listdir(tmp_path / "checkpoints"))
  other = tiny_config.get_config()
  other.model.num_channels = 64
  with pytest.raises(checkpoints.CheckpointConfigError, match="model.num_channels: "
                     "checkpoint 32, config 64"):
    train.train_and_sample(other, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == saved
  config.train.num_steps = 6
  state = train.train_and_sample(config, str(tmp_path))
  assert int(state.step) == 6
  # Another objective is refused unless asked for, and then recorded where it starts.
  changed = config.copy_and_resolve_references()
  changed.diffusion.weighting = "constant"
  changed.train.num_steps = 7
  with pytest.raises(checkpoints.CheckpointConfigError,
                     match="diffusion.weighting: checkpoint 'debias', config 'constant'"):
    train.train_and_sample(changed, str(tmp_path))
  assert int(run_lib.load_checkpoint(str(tmp_path)).step) == 6
  changed.train.allow_objective_change = True
  assert int(train.train_and_sample(changed, str(tmp_path)).step) == 7
  row = [r for r in reporting.read_metrics(str(tmp_path)) if r["step"] == 6][0]
  assert row["objective_changed"] == 1.0 and "'constant'" in row["objective_change"]


def test_bad_input_gives_one_clear_error(tmp_path, monkeypatch):
  config = tiny_config.get_config()
  with pytest.raises(ValueError, match="choose one of .*'debias'"):
    c = tiny_config.get_config()
    c.diffusion.weighting = "debiased"
    config_lib.validate_config(c)
  with pytest.raises(ValueError, match=r"Unknown config field\(s\) \['train.num_stepz'\]"):
    c = tiny_config.get_config()
    c.train.num_stepz = 3
    config_lib.validate_config(c)
  with pytest.raises(ValueError, match="does not divide across 3 devices"):
    config_lib.validate_config(config, num_devices=3)
  with pytest.raises(ValueError, match="image_size=28 is not divisible by 8"):
    c = tiny_config.get_config()
    c.model.update(image_size=28, channel_mult="1,2,2,2")
    c.data.image_size = 28
    config_lib.validate_config(c)
  with pytest.raises(ValueError, match="learn_sigma"):
    c = tiny_config.get_config()
    c.diffusion.var_type = "fixed_small"
    config_lib.validate_config(c)
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(paths.StorageError, match="not writable"):
    train.train_and_sample(config, str(blocker / "workdir"))
  monkeypatch.setattr(sources, "FASHION_MNIST_DIRS", (str(tmp_path / "none"),))
  c = tiny_config.get_config()
  c.data.update(dataset="fashion_mnist", data_dir=str(tmp_path / "no_tfds"))
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    train.train_and_sample(c, str(tmp_path / "wd"))


def test_nan_guard(tmp_path, monkeypatch, caplog):
  # A NaN learning rate (which validation refuses) makes every update non-finite.
  monkeypatch.setattr(config_lib, "learning_rate_schedule",
                      lambda config: (lambda step: jnp.float32(jnp.nan)))
  config = tiny_config.get_config()
  config.train.update(num_steps=4, checkpoint_every=2, log_every=1)
  with pytest.raises(train.NonFiniteLossError, match="no checkpoint was written yet"):
    train.train_and_sample(config, str(tmp_path / "halt"))
  config.train.nan_policy = "skip"
  state = train.train_and_sample(config, str(tmp_path / "skip"))
  assert int(state.step) == 4 and int(state.nonfinite_steps) == 4
  assert "dropped 4 of 4 steps" in caplog.text
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def _compiled_step_with(tx, schedule=None):
  """The tiny config's state, compiled step and first batch, with optimizer `tx`."""
  config = tiny_config.get_config()
  components = config_lib.build(config)._replace(tx=tx)
  settings = config_lib.train_settings(config)
  if schedule is not None:
    settings = settings._replace(learning_rate=schedule)
  mesh = state_lib.make_mesh(config)
  state, shardings = state_lib.create_train_state(components, settings, mesh)
  step = train.jit_train_step(components, settings, mesh, shardings)
  return state, step, next(input_pipeline.create_iterator(config.data, 0))


def test_nan_guard_checks_the_learning_rate_of_committed_steps():
  """The guard asks for the learning rate at the optimizer's own count (committed steps):
  a schedule that turns NaN from count 2 commits two steps and drops the rest."""
  schedule = lambda count: jnp.where(count >= 2, jnp.nan, 1e-3).astype(jnp.float32)
  state, step, batch = _compiled_step_with(optax.adamw(schedule), schedule)
  finite = []
  for _ in range(4):
    state, metrics = step(state, batch)
    finite.append(float(metrics["finite"]))
  assert finite == [1.0, 1.0, 0.0, 0.0]
  assert int(state.step) == 4 and int(state.nonfinite_steps) == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_optimizer_without_a_schedule_is_refused_with_the_fix():
  state, step, batch = _compiled_step_with(optax.adamw(1e-3))
  with pytest.raises(ValueError, match=r"found 0\. .*optax\.constant_schedule"):
    step(state, batch)


# ---------- multi-device and process-level behaviour (subprocesses) ----------

@pytest.mark.slow  # two compiles in a subprocess with 8 devices (~40 s)
def test_eight_devices_equal_one_device():
  script = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from diffusion_jax import config_lib
    from diffusion_jax.data import input_pipeline
    from diffusion_jax.training import train
    from diffusion_jax import state as state_lib
    from tests import tiny_config
    config = tiny_config.get_config()
    # Adam's first steps are ±lr wherever |g| >> eps, so reduction-order noise in a
    # near-zero gradient moves a parameter by up to lr. A larger eps keeps Adam
    # proportional to g there, and the comparison meaningful.
    config.optim.eps = 1e-3
    components, settings = config_lib.build(config), config_lib.train_settings(config)
    model, diffusion = components.model, components.diffusion
    it = input_pipeline.create_iterator(config.data, 0)
    batches = [next(it) for _ in range(2)]
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = state_lib.make_mesh(config, devices)
      state, sh = state_lib.create_train_state(components, settings, mesh)
      bs = state_lib.batch_sharding(mesh)
      step = train.jit_train_step(components, settings, mesh, sh)
      logged = []
      for b in batches:
        b = {k: jax.device_put(v, bs) for k, v in b.items()}
        state, m = step(state, b)
        logged.append((float(m["loss"]), float(m["grad_norm"])))
      out.append((jax.device_get(state.params), logged))
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)
    a, b = (jax.flatten_util.ravel_pytree(p)[0] for p, _ in out)
    p0 = jax.flatten_util.ravel_pytree(
        state_lib.create_train_state(components, settings, mesh)[0].params)[0]
    err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a - p0)))
    print("max parameter difference relative to the largest update", err)
    assert err < 1e-4, err
    # Sampling gives the same images on 1 and on 8 devices.
    from diffusion_jax.sampling import samplers
    from jax.sharding import Mesh
    config.sample.update(num_samples=8, batch_size=8, steps=4, sampler="ddim")
    imgs = [samplers.generate(model, diffusion, out[0][0], config.sample, "", class_cond=False,
                              num_classes=1, image_shape=(32, 32, 1), write=False,
                              mesh=Mesh(np.array(d), ("data",)))["images"]
            for d in (jax.devices()[:1], jax.devices())]
    diff = np.abs(imgs[0].astype(int) - imgs[1].astype(int))
    print("sample pixels differing:", (diff > 0).mean(), "max", diff.max())
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
  """)
  r = subprocess.run([sys.executable, "-c", "import jax.flatten_util\n" + script],
                     env=_env(8), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]


def _cli(workdir, *overrides):
  return [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
          f"--workdir={workdir}", "--mode=train", *overrides]


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["debias", "learned"])
def test_sigkill_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, weighting):
  args = ["--config.train.num_steps=12", "--config.train.checkpoint_every=4",
          f"--config.diffusion.weighting={weighting}"]
  ref = subprocess.run(_cli(tmp_path / "ref", *args), env=_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  saved = process_kill.kill_after_first_checkpoint(_cli(tmp_path / "killed", *args),
                                                  tmp_path / "killed", _env(), REPO, 0.5)
  assert max(saved) < 12, f"the run finished before it was killed: {saved}"
  rerun = subprocess.run(_cli(tmp_path / "killed", *args), env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  a = run_lib.load_checkpoint(str(tmp_path / "ref"))
  b = run_lib.load_checkpoint(str(tmp_path / "killed"))
  assert int(a.step) == int(b.step) == 12
  _assert_trees_equal(a, b)


def test_a_run_ends_with_a_summary_and_a_finished_run_is_not_redone(tmp_path):
  first = subprocess.run(_cli(tmp_path), env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  out = first.stdout
  assert "Finished at step 6 of 6: 6 steps in" in out and "final loss" in out
  # The plan comes before the first compile; the time left once a log interval is timed.
  plan = "Plan: steps 0 → 6, batch 8 over 1 cpu device,"
  order = [out.find(s) for s in (plan, f"  Outputs in {tmp_path}: checkpoints/",
                                 "compiling the train step: ", "Step time ",
                                 "compiling the ddim sampler", "Finished at step 6")]
  assert -1 not in order and order == sorted(order), out
  for line in (f"checkpoint: {tmp_path}/checkpoints/6", f"samples:    {tmp_path}/samples.png",
               f"loss curve: {tmp_path}/loss_curve.png", f"metrics:    {tmp_path}/metrics.jsonl"):
    assert line in out, out
  files = sorted(p.name for p in tmp_path.rglob("*") if "compilation_cache" not in str(p))
  metrics = (tmp_path / "metrics.jsonl").read_text()
  samples = (tmp_path / "samples.png").read_bytes()
  again = subprocess.run(_cli(tmp_path), env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already holds a finished run: step 6" in again.stdout
  assert "--mode=sample" in again.stdout and "train:" not in again.stderr  # no training bar
  assert sorted(p.name for p in tmp_path.rglob("*")
                if "compilation_cache" not in str(p)) == files  # nothing new written
  assert (tmp_path / "metrics.jsonl").read_text() == metrics
  assert (tmp_path / "samples.png").read_bytes() == samples
  # Asking for more steps trains on from the checkpoint.
  more = subprocess.run(_cli(tmp_path, "--config.train.num_steps=7"), env=_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert more.returncode == 0 and "Finished at step 7 of 7: 1 steps" in more.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_the_current_step(sig, tmp_path):
  args = ["--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
          "--config.train.log_every=1"]
  proc = subprocess.Popen(_cli(tmp_path, *args), env=_env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and "loss" in metrics.read_text()):
    time.sleep(0.1)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert len(steps) == 1 and steps[0] >= 1
  last_logged = max(json.loads(l)["step"] for l in metrics.read_text().splitlines())
  assert steps[0] == last_logged


def _small_file_limit():
  """A child process where no file may exceed 200 kB: writes past it fail (EFBIG) like a
  full disk, while the small files of a run (metrics, PNGs, the lock) still fit."""
  import resource  # pylint: disable=import-outside-toplevel
  resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_failed_save_is_reported_at_the_next_step(tmp_path):
  args = ["--config.train.num_steps=400", "--config.train.checkpoint_every=2",
          "--config.train.log_every=1", "--config.train.compilation_cache_dir=none",
          "--cpu_devices=1"]
  run = subprocess.run(_cli(tmp_path, *args), env=_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=600, preexec_fn=_small_file_limit)
  assert run.returncode == 2, run.stderr[-3000:]
  line = [l for l in run.stderr.splitlines() if l.startswith("error: Saving checkpoint")]
  assert line and "step 2 " in line[0] and "no space left" in line[0], run.stderr[-3000:]
  assert "none yet" in line[0]
  # Orbax's and TensorStore's error records (hundreds of traceback lines) are left out.
  logged = [l for l in run.stderr.splitlines() if re.match(r"(E\d{4} |ERROR:)", l)]
  assert not logged, logged[:5]
  # Nor the "Event loop is closed" tracebacks of writes that finish after the failure.
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  last = max(r["step"] for r in reporting.read_metrics(str(tmp_path)))
  assert last < 100, f"the run went on to step {last} after the failed save"


def _digits_iterator(seed=0):
  return iter(input_pipeline.make_dataset(sources.load_digits(), batch_size=4,
                                          seed=seed, random_flip=True))


def test_prefetcher_yields_the_same_batches_with_their_resume_states():
  direct = _digits_iterator()
  expected = []
  for _ in range(5):
    state = direct.get_state()
    expected.append((next(direct)["image"], state))
  with input_pipeline.Prefetcher(_digits_iterator(), lambda b: b["image"] * 1, 2) as pf:
    for i, (images, state) in enumerate(expected):
      if i == 3:
        assert pf.state() == state  # peeking does not consume
      got, got_state = pf.next()
      np.testing.assert_array_equal(got, images)
      assert got_state == state
  resumed = _digits_iterator()
  resumed.set_state(expected[3][1])
  np.testing.assert_array_equal(next(resumed)["image"], expected[3][0])


def test_prefetcher_reraises_reader_errors():
  def broken(batch):
    raise OSError("disk went away")
  with input_pipeline.Prefetcher(_digits_iterator(), broken) as pf:
    with pytest.raises(OSError, match="disk went away"):
      pf.next()


def _config_lib_entries(fn) -> list[str]:
  """The config_lib functions that package code outside config_lib calls while fn() runs."""
  import threading  # pylint: disable=import-outside-toplevel
  own, package = config_lib.__file__, os.path.dirname(config_lib.__file__)
  entries = []

  def profile(frame, event, arg):
    caller = frame.f_back
    if (event == "call" and frame.f_code.co_filename == own and caller is not None
        and caller.f_code.co_filename != own
        and caller.f_code.co_filename.startswith(package)):
      entries.append(frame.f_code.co_name)

  sys.setprofile(profile)
  threading.setprofile(profile)
  try:
    fn()
  finally:
    sys.setprofile(None)
    threading.setprofile(None)
  return entries


def test_the_config_enters_config_lib_once_per_run_and_once_more_on_resume(tmp_path):
  """train_and_sample hands the config to config_lib.training() (validate, build, the
  loop's settings, the JSON saved with checkpoints); the loop, state, checkpoints and
  samplers take what it built. A resume also compares the saved config."""
  config = tiny_config.get_config()
  config.train.update(num_steps=1, log_every=1, checkpoint_every=1, sample_every=0)
  config.sample.update(num_samples=2, batch_size=2, steps=2)
  config.eval.classifier = False
  fresh = _config_lib_entries(lambda: train.train_and_sample(config, str(tmp_path)))
  config.train.num_steps = 2
  resumed = _config_lib_entries(lambda: train.train_and_sample(config, str(tmp_path)))
  assert fresh == ["training"]
  assert resumed == ["training", "saved_differences"]
  assert checkpoints.checkpoint_steps(str(tmp_path)) == [1, 2]
