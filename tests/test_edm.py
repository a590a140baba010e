"""EDM's Euler and Heun samplers: Gaussian data, order of convergence, k-diffusion parity.

k-diffusion (PyPI `k-diffusion==0.1.1.post1`, installed with --no-deps by the README's
test command) is the oracle: its `sampling.sample_euler`/`sample_heun`,
`get_sigmas_karras` and `external.DiscreteEpsDDPMDenoiser` run unmodified on the same
exact Gaussian denoiser. Only its package __init__ (which imports training and
evaluation code) is bypassed, and the two imports its utils module makes at load time
but that sampling never calls (torchvision, safetensors) are stubbed.
"""
import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest

from diffusion_jax.sampling import edm
from diffusion_jax.sampling import samplers
from tests.gaussian_data import MU
from tests.gaussian_data import STD
from tests.gaussian_data import exact_model
from tests.gaussian_data import make_diffusion
from tests.gaussian_data import run_sampler


@pytest.mark.parametrize("sampler,steps,churn,std_rtol", [
    ("euler", 128, 0.0, 0.03), ("heun", 32, 0.0, 0.03), ("heun", 64, 40.0, 0.04)])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samples_reproduce_the_data_distribution(sampler, steps, churn, std_rtol, schedule):
  x = run_sampler(make_diffusion(schedule=schedule), sampler, steps, rule="log_sigma",
                  s_churn=churn)
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), MU, atol=0.02)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), STD, rtol=std_rtol)


def _ode_error(sampler, steps, noise):
  """Max |error| of the deterministic sampler against the exact probability-flow ODE
  solution, followed to σ_0 and then denoised (the final step every N shares)."""
  diff = make_diffusion()
  x = jax.jit(lambda n: edm.solve(diff, exact_model(diff, rule="log_sigma"), n, sampler,
                                  steps, jax.random.PRNGKey(0), clip_denoised=False))(noise)
  table = edm.sigma_table(diff)
  lo, hi = table[0], min(edm.SIGMA_MAX, table[-1])
  var = np.float64(STD) ** 2
  x_lo = MU + np.sqrt((var + lo**2) / (var + hi**2)) * (np.float64(noise) * hi - MU)
  exact = MU + var / (var + lo**2) * (x_lo - MU)
  return np.abs(np.float64(x) - exact).max()


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_the_ode_error_falls_at_the_method_order(sampler, order):
  noise = jax.random.normal(jax.random.PRNGKey(1), (64, 2, 2, 3))
  steps = [8, 16, 32, 64]
  errors = [_ode_error(sampler, n, noise) for n in steps]
  slopes = -np.diff(np.log(errors)) / np.diff(np.log(steps))
  print(sampler, dict(zip(steps, errors)), slopes)
  assert np.all(np.diff(errors) < 0), errors
  np.testing.assert_allclose(slopes[-2:], order, atol=0.25)


def test_churn_only_where_asked_and_reproducible():
  diff = make_diffusion()
  fn = exact_model(diff, rule="log_sigma")
  noise = jax.random.normal(jax.random.PRNGKey(2), (8, 2, 2, 3))
  run = lambda key, **kw: np.asarray(edm.solve(diff, fn, noise, "heun", 10, key,
                                               clip_denoised=False, **kw))
  a, b = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  np.testing.assert_array_equal(run(a), run(b))                    # deterministic ODE
  np.testing.assert_array_equal(run(a, s_churn=20.0), run(a, s_churn=20.0))
  assert np.abs(run(a, s_churn=20.0) - run(b, s_churn=20.0)).max() > 1e-3
  # No level lies in [s_tmin, s_tmax]: no churn, so the ODE result exactly.
  np.testing.assert_array_equal(run(a, s_churn=20.0, s_tmin=1e4, s_tmax=1e5), run(a))
  np.testing.assert_allclose(edm.churn(edm.karras_sigmas(0.01, 80.0, 4), 40.0, 0.05, 50.0),
                             [0.0, np.sqrt(2) - 1, np.sqrt(2) - 1, 0.0])


def test_x0_and_v_models_give_the_eps_samples():
  eps = run_sampler(make_diffusion("eps"), "heun", 10, "eps", key=3, rule="log_sigma")
  for target in ("x0", "v"):
    other = run_sampler(make_diffusion(target), "heun", 10, target, key=3, rule="log_sigma")
    np.testing.assert_allclose(other, eps, atol=2e-4)


def test_edm_options_are_checked_and_reach_the_sampler():
  options = samplers.SamplerOptions(sampler="heun", steps=9, s_churn=30.0, s_tmin=0.05,
                                    s_tmax=50.0, s_noise=1.003).check()
  assert options.kwargs()["s_churn"] == 30.0 and "order" not in options.kwargs()
  assert options.with_sampler("ddim", 20) == samplers.SamplerOptions(sampler="ddim", steps=20)
  with pytest.raises(ValueError, match=r"s_churn=5.0: applies to \['euler', 'heun'\]"):
    samplers.SamplerOptions(sampler="ddim", s_churn=5.0).check()
  with pytest.raises(ValueError, match="s_noise=-1.0: must be a number ≥ 0"):
    samplers.SamplerOptions(sampler="euler", s_noise=-1.0).check()
  with pytest.raises(ValueError, match="s_tmin=2.0 > s_tmax=1.0"):
    samplers.SamplerOptions(sampler="heun", s_tmin=2.0, s_tmax=1.0).check()


# ---------- parity with k-diffusion on the same denoiser ----------

@pytest.fixture(name="kdiff")
def _kdiff(monkeypatch):
  """k-diffusion's sampling and external modules, loaded without its package __init__."""
  spec = importlib.util.find_spec("k_diffusion")
  if spec is None:
    pytest.fail("k-diffusion is the oracle here: pip install --no-deps k-diffusion==0.1.1.post1")
  import torch  # pylint: disable=import-outside-toplevel
  package = types.ModuleType("k_diffusion")
  package.__path__ = list(spec.submodule_search_locations)
  monkeypatch.setitem(sys.modules, "k_diffusion", package)
  missing = {n for n in ("torchvision", "safetensors") if importlib.util.find_spec(n) is None}
  for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
               "safetensors"):
    if name.split(".")[0] in missing:
      monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
  for name in ("k_diffusion.utils", "k_diffusion.sampling", "k_diffusion.external"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  return (torch, importlib.import_module("k_diffusion.sampling"),
          importlib.import_module("k_diffusion.external"))


def _torch_exact_eps(torch, denoiser):
  """The exact ε of N(MU, STD²) data at k-diffusion's fractional t (its own t_to_sigma)."""
  def eps(x_vp, t):
    mu, std = torch.tensor(MU).to(x_vp.dtype), torch.tensor(STD).to(x_vp.dtype)
    sigma = denoiser.t_to_sigma(t)[:, None, None, None]
    abar = 1 / (1 + sigma**2)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    return s * (x_vp - a * mu) / (a**2 * std**2 + s**2)
  return eps


# float64: the same arithmetic, so any difference is a difference of method (k-diffusion's
# t_to_sigma casts t to float32: differences of 1e-8 remain). float32: what sampling runs;
# churn's noise enters at σ̂ up to 80, which amplifies rounding.
@pytest.mark.parametrize("dtype,atol", [("float64", 1e-7), ("float32", 1e-5)])
@pytest.mark.parametrize("sampler,churn", [("euler", 0.0), ("heun", 0.0), ("euler", 30.0),
                                           ("heun", 30.0)])
def test_matches_k_diffusion(kdiff, sampler, churn, dtype, atol):
  torch, k_sampling, k_external = kdiff
  if dtype == "float32" and churn:
    atol = 1e-4
  diff = make_diffusion()
  steps, key = 12, jax.random.PRNGKey(5)
  churn_kw = dict(s_churn=churn, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  with jax.enable_x64(dtype == "float64"):
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (16, 2, 2, 3), dtype))
    ours = np.asarray(jax.jit(lambda n: edm.solve(
        diff, exact_model(diff, rule="log_sigma"), n, sampler, steps, key,
        clip_denoised=False, **churn_kw))(noise))
    draws = iter([np.asarray(jax.random.normal(jax.random.fold_in(key, i), noise.shape, dtype))
                  for i in range(steps)])
  assert ours.dtype == dtype
  # k-diffusion draws one torch.randn_like per step; it gets the same normals as ours.
  fake_randn = lambda x: torch.tensor(next(draws)).to(x.dtype)
  default_dtype = torch.get_default_dtype()
  torch.set_default_dtype(getattr(torch, dtype))  # get_sigmas_karras' linspace
  try:
    denoiser = k_external.DiscreteEpsDDPMDenoiser(
        None, torch.tensor(np.asarray(diff.alphas_cumprod), dtype=getattr(torch, dtype)),
        quantize=False)
    denoiser.inner_model = _torch_exact_eps(torch, denoiser)
    sigmas = k_sampling.get_sigmas_karras(steps, denoiser.sigma_min.item(), edm.SIGMA_MAX,
                                          rho=7.0)
    run = {"euler": k_sampling.sample_euler, "heun": k_sampling.sample_heun}[sampler]
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(torch, "randn_like", fake_randn)
      theirs = run(denoiser, torch.tensor(noise) * sigmas[0], sigmas, disable=True,
                   **churn_kw).numpy()
  finally:
    torch.set_default_dtype(default_dtype)
  np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0)
  assert np.abs(ours - noise).max() > 0.1  # it did sample
