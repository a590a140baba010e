"""Samplers on Gaussian data, where the exact predictor is known in closed form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import diffusion as diffusion_lib
from diffusion_jax.core import schedules
from diffusion_jax.sampling import samplers
from tests.gaussian_data import MU
from tests.gaussian_data import SHAPE
from tests.gaussian_data import STD
from tests.gaussian_data import exact_model
from tests.gaussian_data import make_diffusion as _diffusion
from tests.gaussian_data import run_sampler as _run


# Few-step samplers shrink the spread (DDIM-50 gives 0.178 for the 0.2 channel here,
# DDIM-1000 0.200): the std tolerance follows each sampler's discretisation error.
@pytest.mark.parametrize("sampler,steps,std_rtol", [("ddpm", 250, 0.07), ("ddim", 50, 0.13),
                                                    ("dpm_solver++", 20, 0.04),
                                                    ("unipc", 20, 0.04)])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samples_reproduce_the_data_distribution(sampler, steps, std_rtol, schedule):
  x = _run(_diffusion(schedule=schedule), sampler, steps)
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), MU, atol=0.02)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), STD, rtol=std_rtol)


def test_many_steps_converge_to_the_exact_distribution():
  x = _run(_diffusion(), "ddim", 1000)
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), MU, atol=0.01)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), STD, rtol=0.01)


@pytest.mark.parametrize("sampler,steps", [("ddim", 20), ("ddpm", 20),
                                           ("dpm_solver++", 10), ("unipc", 10)])
def test_x0_and_v_models_give_the_eps_samples(sampler, steps):
  eps = _run(_diffusion("eps"), sampler, steps, "eps", key=3)
  for target in ("x0", "v"):
    other = _run(_diffusion(target), sampler, steps, target, key=3)
    np.testing.assert_allclose(other, eps, atol=2e-4)


# ---------- single steps against guided-diffusion's formulas (numpy, float64) ----------

def _np_step_reference(betas, x, t, out, noise, kind, eta=0.0):
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  b = lambda a: a[t][:, None, None, None]
  c = x.shape[-1]
  eps, var_vals = out[..., :c], out[..., c:]
  x0 = np.clip(np.sqrt(1 / b(abar)) * x - np.sqrt(1 / b(abar) - 1) * eps, -1, 1)
  if kind == "ddpm":
    pv = betas * (1 - abar_prev) / (1 - abar)
    min_log = b(np.log(np.append(pv[1], pv[1:])))
    frac = (var_vals + 1) / 2
    log_var = frac * b(np.log(betas)) + (1 - frac) * min_log
    mean = (b(betas * np.sqrt(abar_prev) / (1 - abar)) * x0
            + b((1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)) * x)
    return mean + (t != 0)[:, None, None, None] * np.exp(0.5 * log_var) * noise
  eps_re = (np.sqrt(1 / b(abar)) * x - x0) / np.sqrt(1 / b(abar) - 1)
  sigma = eta * np.sqrt((1 - b(abar_prev)) / (1 - b(abar))) * np.sqrt(1 - b(abar) / b(abar_prev))
  mean = x0 * np.sqrt(b(abar_prev)) + np.sqrt(1 - b(abar_prev) - sigma**2) * eps_re
  return mean + (t != 0)[:, None, None, None] * sigma * noise


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_single_steps_equal_guided_diffusion(kind, dtype, rtol):
  with jax.enable_x64(dtype == np.float64):
    _single_step_check(kind, dtype, rtol)


def _single_step_check(kind, dtype, rtol):
  betas = schedules.get_named_beta_schedule("linear", 1000)
  diff = diffusion_lib.GaussianDiffusion(betas, var_type="learned_range")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 3, 3, 3)).astype(dtype)
  out = rng.uniform(-1, 1, size=(4, 3, 3, 6)).astype(dtype)
  t = np.array([0, 1, 500, 999], np.int32)
  key = jax.random.PRNGKey(5)
  noise = np.asarray(jax.random.normal(key, x.shape, dtype), np.float64)
  model_fn = lambda *_: jnp.asarray(out)
  if kind == "ddpm":
    got = samplers.p_sample(diff, model_fn, x, t, key)["sample"]
  else:
    got = samplers.ddim_sample(diff, model_fn, x, t, key, eta=0.5)["sample"]
  want = _np_step_reference(betas, x.astype(np.float64), t, out.astype(np.float64), noise,
                            kind, eta=0.5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol)


def test_bad_sampler_arguments():
  diff = _diffusion()
  with pytest.raises(ValueError, match="'dpm_solver\\+\\+', 'unipc', 'euler', 'heun'"):
    samplers.sample(diff, exact_model(diff), SHAPE, jax.random.PRNGKey(0), sampler="lms")
  with pytest.raises(ValueError, match="steps=0"):
    samplers.sample(diff, exact_model(diff), SHAPE, jax.random.PRNGKey(0), steps=0)


def test_sampler_options_are_the_config_fields_and_reach_sample():
  """config.sample's sampling fields are SamplerOptions' (one list), a bad one names its
  field, and kwargs() draws the same samples as the keywords written out."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from diffusion_jax.configs import defaults  # pylint: disable=import-outside-toplevel
  names = [f.name for f in dataclasses.fields(samplers.SamplerOptions)]
  sample_config = defaults.get_config().sample
  assert set(names) <= set(sample_config.keys())
  assert samplers.SamplerOptions.from_config(sample_config) == samplers.SamplerOptions()
  for bad, message in [(dict(sampler="ddim", order=3), "config.sample.order=3: applies to"),
                       (dict(sampler="unipc", order=4), "UniPC takes order 1, 2 or 3"),
                       (dict(skip_type="uniform"), "config.sample.skip_type='uniform'"),
                       (dict(steps=0), "config.sample.steps=0"),
                       (dict(eta=-1.0), "config.sample.eta=-1.0")]:
    with pytest.raises(ValueError, match=message):
      samplers.SamplerOptions(**bad).check()
  unipc = samplers.SamplerOptions(sampler="unipc", steps=5, order=3).check()
  assert unipc.with_sampler("ddim", 7) == samplers.SamplerOptions(sampler="ddim", steps=7)
  diff, key = _diffusion(), jax.random.PRNGKey(3)
  got = samplers.sample(diff, exact_model(diff), SHAPE, key, **unipc.kwargs())
  want = samplers.sample(diff, exact_model(diff), SHAPE, key, sampler="unipc", steps=5,
                         order=3)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  other = samplers.sample(diff, exact_model(diff), SHAPE, key, sampler="unipc", steps=5,
                          order=1)
  assert np.abs(np.asarray(got) - np.asarray(other)).max() > 0


def test_an_interrupted_generate_keeps_its_batches_and_a_rerun_computes_only_the_rest(
    tmp_path, monkeypatch):
  """SIGTERM during --mode=sample lost every finished batch; now each is kept as it
  finishes and the rerun draws only the missing ones, ending with the same images."""
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import models  # pylint: disable=import-outside-toplevel
  from tests import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config.get_config()
  model, diffusion = config_lib.build_model(config), config_lib.build_diffusion(config)
  params = models.init_params(model, jax.random.PRNGKey(0))
  s = config.sample.copy_and_resolve_references()
  s.update(sampler="ddim", steps=2, num_samples=10, batch_size=4)
  kwargs = dict(class_cond=False, num_classes=1, image_shape=(32, 32, 1))
  whole = samplers.generate(model, diffusion, params, s, str(tmp_path / "whole"),
                            **kwargs)["images"]
  fold_in, drawn = jax.random.fold_in, []

  def stop_at_batch_2(key, b):  # generate's per-batch fold_in gets a Python int
    if isinstance(b, int):
      if b == 2:
        raise KeyboardInterrupt("SIGTERM")
      drawn.append(b)
    return fold_in(key, b)

  def count(key, b):
    if isinstance(b, int):
      drawn.append(b)
    return fold_in(key, b)

  out = str(tmp_path / "resumed")
  monkeypatch.setattr(jax.random, "fold_in", stop_at_batch_2)
  with pytest.raises(KeyboardInterrupt):
    samplers.generate(model, diffusion, params, s, out, resume_key="k", **kwargs)
  assert drawn == [0, 1] and len(list((tmp_path / "resumed").glob("partial_*/batch_*"))) == 2
  monkeypatch.setattr(jax.random, "fold_in", count)
  resumed = samplers.generate(model, diffusion, params, s, out, resume_key="k", **kwargs)
  assert drawn == [0, 1, 2]  # only the missing batch
  np.testing.assert_array_equal(resumed["images"], whole)
  assert not list((tmp_path / "resumed").glob("partial_*"))  # removed once written
  assert (tmp_path / "resumed" / "samples_grid.png").exists()


@pytest.mark.slow  # a tiny training, then three sampling runs (~1.5 min)
def test_sigterm_during_sample_mode_keeps_batches_and_the_rerun_finishes_them(tmp_path):
  import os  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  from diffusion_jax.training import train  # pylint: disable=import-outside-toplevel
  from tests import tiny_config  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  train.train_and_sample(tiny_config.get_config(), str(tmp_path / "wd"))
  shutil.copytree(tmp_path / "wd", tmp_path / "whole")
  cmd = lambda wd: [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
                    f"--workdir={wd}", "--mode=sample", "--cpu_devices=1",
                    "--config.sample.num_samples=40", "--config.sample.batch_size=4",
                    "--config.sample.steps=20"]
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd(tmp_path / "wd"), cwd=repo, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not list((tmp_path / "wd").glob("samples/ddim_20/partial_*/batch_*.npz")):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "Finished batches are kept" in err, err[-2000:]
  kept = len(list((tmp_path / "wd").glob("samples/ddim_20/partial_*/batch_*.npz")))
  assert 1 <= kept < 10
  rerun = subprocess.run(cmd(tmp_path / "wd"), cwd=repo, env=env, capture_output=True,
                         text=True, timeout=300)
  assert rerun.returncode == 0 and f"Resuming: {kept} of 10 batches" in rerun.stdout, (
      rerun.stdout + rerun.stderr[-2000:])
  whole = subprocess.run(cmd(tmp_path / "whole"), cwd=repo, env=env, capture_output=True,
                         text=True, timeout=300)
  assert whole.returncode == 0
  got, want = (np.load(tmp_path / d / "samples/ddim_20/samples.npz")["arr_0"]
               for d in ("wd", "whole"))
  np.testing.assert_array_equal(got, want)
