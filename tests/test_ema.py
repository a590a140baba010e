"""Power-function EMA and its post-hoc reconstruction (EDM2), unit and through the CLI."""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import ema

REPO = pathlib.Path(__file__).resolve().parents[1]


def _weights(gamma, t):
  """The weight of each step 1..t in a power EMA after t updates, from its decays."""
  betas = np.array([float(ema.power_decay(gamma, np.float64(k))) for k in range(1, t + 1)])
  # step k enters with 1 − β_k and is then multiplied by every later β
  later = np.append(np.cumprod(betas[::-1])[::-1][1:], 1.0)
  return (1 - betas) * later


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_the_update_weighs_steps_with_the_requested_relative_std(sigma_rel):
  t = 20000
  w = _weights(ema.sigma_rel_to_gamma(sigma_rel), t)
  tau = np.arange(1, t + 1) / t
  mean = np.sum(w * tau)
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-9)
  np.testing.assert_allclose(np.sqrt(np.sum(w * (tau - mean) ** 2)), sigma_rel, rtol=2e-3)
  assert ema.gamma_to_sigma_rel(ema.sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel)


def test_bad_sigma_rel_is_refused():
  for bad in (0.0, -0.1, 0.3):
    with pytest.raises(ValueError, match="must lie in"):
      ema.sigma_rel_to_gamma(bad)


def test_a_tracked_profile_is_its_own_reconstruction():
  gammas = [ema.sigma_rel_to_gamma(s) for s in (0.05, 0.1)]
  steps = np.repeat([100, 200, 300], 2)
  x, error = ema.coefficients(steps, np.tile(gammas, 3), 300, gammas[1])
  np.testing.assert_allclose(x, [0, 0, 0, 0, 0, 1], atol=1e-6)
  assert error < 1e-6


def _trajectory(steps, dim, seed=0):
  """Params of a noisy optimisation: a drift towards a target plus a random walk."""
  rng = np.random.default_rng(seed)
  theta, out = np.zeros(dim), []
  target = rng.normal(size=dim)
  for _ in range(steps):
    theta = theta + 0.003 * (target - theta) + 0.02 * rng.normal(size=dim)
    out.append(theta.copy())
  return np.array(out, np.float32)


def test_reconstruction_matches_a_directly_tracked_profile(tmp_path):
  """0.05 and 0.10 are tracked and snapshotted every 100 steps; 0.075, reconstructed
  from them after 3000 steps, is compared with 0.075 tracked directly."""
  total, every, dim = 3000, 100, 256
  stds = (0.05, 0.1, 0.075)
  gammas = [ema.sigma_rel_to_gamma(s) for s in stds]
  trajectory = _trajectory(total, dim)
  tracked = [jnp.zeros(dim, jnp.float32) for _ in stds]
  update = jax.jit(lambda e, p, step: [d * x + (1 - d) * p for d, x in
                                       zip(ema.decays((), gammas, step), e)])
  for step in range(total):
    tracked = update(tracked, trajectory[step], jnp.int32(step))
    if (step + 1) % every == 0:
      ema.save_snapshot(tmp_path, step + 1, [{"layer": {"w": tracked[0]}},
                                             {"layer": {"w": tracked[1]}}])
  abstract = {"layer": {"w": jax.ShapeDtypeStruct((dim,), jnp.float32)}}
  out = ema.reconstruct(tmp_path, stds[:2], abstract, 0.075)
  params, step = ema.load_reconstructed(tmp_path, 0.075, abstract)
  direct = np.asarray(tracked[2])
  recon = params["layer"]["w"]
  scale = np.abs(direct - trajectory[-1]).max()  # how far any EMA sits from the params
  print(f"fit error {out['fit_error']:.2e}, max |recon − direct| "
        f"{np.abs(recon - direct).max():.2e}, scale {scale:.2e}")
  assert step == total and len(out["snapshots"]) == total // every
  assert out["fit_error"] < 0.01
  np.testing.assert_allclose(recon, direct, atol=1e-3 * scale)  # seen: 1e-4 × scale
  # A different length is really different: 0.05 tracked is far from 0.075.
  assert np.abs(np.asarray(tracked[0]) - direct).max() > 0.1 * scale


def test_damaged_or_foreign_files_are_refused(tmp_path):
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  ema.save_snapshot(tmp_path, 10, [{"w": np.zeros(4, np.float32)}])
  with pytest.raises(ValueError, match="names differ"):
    ema.reconstruct(tmp_path, (0.05, 0.1), abstract, 0.07)  # the run had two profiles
  (tmp_path / ema.SNAPSHOTS / "000000010.npz").write_bytes(b"PK\x03\x04 not a zip")
  with pytest.raises(Exception):
    ema.reconstruct(tmp_path, (0.05,), abstract, 0.07)
  with pytest.raises(FileNotFoundError, match="--mode=posthoc_ema"):
    ema.load_reconstructed(tmp_path, 0.07, abstract)
  with pytest.raises(FileNotFoundError, match="train.posthoc_ema"):
    ema.reconstruct(tmp_path / "empty", (0.05,), abstract, 0.07)


@pytest.mark.slow
def test_cli_trains_reconstructs_and_samples_a_posthoc_ema(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "wd"
  def cli(*args, expect=0):
    run = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
         f"--workdir={workdir}", "--cpu_devices=1", "--config.eval.classifier=False"]
        + list(args), cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert run.returncode == expect, run.stderr[-3000:]
    return run.stdout + run.stderr
  train = ("--config.train.posthoc_ema=(0.05,0.1)", "--config.train.posthoc_ema_every=2")
  cli("--mode=train", *train)
  # Resuming under other profiles would change the train state: refused, nothing lost.
  out = cli("--mode=train", "--config.train.num_steps=8", expect=2)
  assert "train.posthoc_ema: checkpoint [0.05, 0.1], config []" in out
  assert sorted(p.name for p in (workdir / ema.SNAPSHOTS).iterdir()) == [
      "000000002.npz", "000000004.npz", "000000006.npz"]
  out = cli("--mode=posthoc_ema", "--config.sample.posthoc_ema=0.08")
  assert "at step 6 from 3 snapshots" in out
  out = cli("--mode=sample", "--config.sample.posthoc_ema=0.08")
  assert "samples/ddim_3_phema0.08/samples_grid.png" in out
  cli("--mode=sample")  # the first constant-rate EMA, from the same noise
  posthoc, default = (np.load(workdir / "samples" / name / "samples.npz")["arr_0"]
                      for name in ("ddim_3_phema0.08", "ddim_3"))
  assert posthoc.shape == default.shape == (4, 32, 32, 1)
  assert np.abs(posthoc.astype(int) - default).max() > 0
