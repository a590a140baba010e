"""GaussianDiffusion against a direct float64 numpy computation of guided-diffusion's math."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from diffusion_jax.core import diffusion as diffusion_lib
from diffusion_jax.core import objective
from diffusion_jax.core import schedules

T = 1000
SHAPE = (6, 4, 4, 3)


def _fake_model(channels_out):
  """A fixed nonlinear 'network' of (x_t, t), NHWC."""
  def fn(x, t):
    tt = t.astype(jnp.float32)[:, None, None, None] / T
    h = jnp.tanh(jnp.concatenate([x, x[..., :1] * 0.5], -1) * 0.7 + tt)
    return jnp.tile(h, (1, 1, 1, 2))[..., :channels_out]
  return fn


def _inputs(seed=0, t=None):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
  x0[0, 0, 0, :] = [-1.0, 1.0, 0.0]  # edge bins of the decoder likelihood
  noise = rng.normal(size=SHAPE).astype(np.float32)
  if t is None:
    t = np.array([0, 1, 17, 500, 998, 999], dtype=np.int32)
  return x0, noise, t


# ---------- an independent numpy (float64) reference ----------

def _np_weight(name, snr):
  return {"constant": np.ones_like(snr), "debias": 1 / np.sqrt(snr), "snr": 1 / snr,
          "p2": 1 / (1 + snr), "min_snr": np.minimum(snr, 5) / snr}[name]


def _np_cdf(x):
  return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_decoder_nll(x, mean, log_var):
  inv_std = np.exp(-0.5 * log_var)
  plus = _np_cdf(inv_std * (x - mean + 1 / 255))
  minus = _np_cdf(inv_std * (x - mean - 1 / 255))
  logp = np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)),
                  np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                           np.log(np.maximum(plus - minus, 1e-12))))
  return -logp


def _np_losses(betas, target, var_type, loss_type, weighting, x0, noise, t, out,
               space="eps"):
  x0, noise, out = (np.asarray(a, np.float64) for a in (x0, noise, out))
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  b = lambda a: a[t][:, None, None, None]
  at, st = np.sqrt(b(abar)), np.sqrt(1 - b(abar))
  x_t = at * x0 + st * noise
  c = x0.shape[-1]
  mean_out, var_vals = (out[..., :c], out[..., c:]) if var_type == "learned_range" else (
      out, None)
  tgt = {"eps": noise, "x0": x0, "v": at * noise - st * x0}[target]
  snr = abar / (1 - abar)
  w = _np_weight(weighting, snr)
  if space == "eps":
    w = {"eps": w, "x0": w * snr, "v": w * snr / (1 + snr)}[target]
  sq = (tgt - mean_out) ** 2
  mse = (b(w) * sq).mean(axis=(1, 2, 3))
  # VLB term with the predicted mean (frozen for mse losses: same value).
  pv = betas * (1 - abar_prev) / (1 - abar)
  plv = np.log(np.append(pv[1], pv[1:]))
  x0_hat = {"eps": (x_t - st * mean_out) / at, "x0": mean_out,
            "v": at * x_t - st * mean_out}[target]
  c1 = betas * np.sqrt(abar_prev) / (1 - abar)
  c2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
  true_mean = b(c1) * x0 + b(c2) * x_t
  model_mean = b(c1) * x0_hat + b(c2) * x_t
  if var_type == "learned_range":
    frac = (var_vals + 1) / 2
    model_lv = frac * b(np.log(betas)) + (1 - frac) * b(plv)
  elif var_type == "fixed_small":
    model_lv = b(plv) + 0 * x0
  else:
    model_lv = b(np.log(np.append(pv[1], betas[1:]))) + 0 * x0
  true_var = b(np.exp(plv))
  kl = 0.5 * (-1 + model_lv - np.log(true_var) + true_var / np.exp(model_lv)
              + (true_mean - model_mean) ** 2 / np.exp(model_lv))
  kl = kl.mean(axis=(1, 2, 3)) / np.log(2)
  nll = _np_decoder_nll(x0, model_mean, model_lv).mean(axis=(1, 2, 3)) / np.log(2)
  vb = np.where(t == 0, nll, kl)
  if loss_type in ("kl", "rescaled_kl"):
    vb = vb * (len(betas) if loss_type == "rescaled_kl" else 1)
    return {"loss": vb, "vb": vb}
  res = {"mse": mse}
  if var_type == "learned_range":
    res["vb"] = vb * (len(betas) / 1000 if loss_type == "rescaled_mse" else 1)
    res["loss"] = mse + res["vb"]
  else:
    res["loss"] = mse
  return res


CASES = list(itertools.product(
    ["linear", "cosine"], ["eps", "x0", "v"], ["fixed_small", "fixed_large",
                                               "learned_range"],
    ["mse", "rescaled_mse", "kl", "rescaled_kl"],
    ["constant", "debias", "snr", "p2", "min_snr"]))
# Weightings do not enter the kl losses: keep one weighting there.
CASES = [c for c in CASES if c[3] in ("mse", "rescaled_mse") or c[4] == "constant"]


def _weighted_terms(diff, weighting, model, x0, t, noise, **weighting_params):
  """The per-example terms of the objective `weighting` over `diff` (uniform t)."""
  obj = objective.build(diff, weighting, weighting_params)
  state = obj.init(jax.random.PRNGKey(0))
  return obj.loss(model, obj.trainable(state), state, x0, t, jnp.ones(t.shape), noise)[1]


def _run_losses(schedule, target, var_type, loss_type, weighting, dtype, t=None):
  betas = schedules.get_named_beta_schedule(schedule, T)
  diff = diffusion_lib.GaussianDiffusion(betas, target=target, var_type=var_type,
                                         loss_type=loss_type)
  x0, noise, t = _inputs(t=t)
  x0, noise = x0.astype(dtype), noise.astype(dtype)
  model = _fake_model(6 if var_type == "learned_range" else 3)
  got = jax.jit(lambda x, n, tt: _weighted_terms(diff, weighting, model, x, tt, n))(
      x0, noise, t)
  x_t = diff.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  out = np.asarray(model(x_t, jnp.asarray(t)))
  want = _np_losses(betas, target, var_type, loss_type, weighting, x0, noise, t, out)
  assert ("vb" in got) == ("vb" in want)
  return got, want


@pytest.mark.parametrize("schedule,target,var_type,loss_type,weighting", CASES)
def test_training_losses_match_numpy_in_float64(schedule, target, var_type, loss_type,
                                                weighting):
  """The math, free of float32 rounding: JAX under x64 against numpy."""
  with jax.enable_x64(True):
    got, want = _run_losses(schedule, target, var_type, loss_type, weighting, np.float64)
    for k, v in want.items():
      assert got[k].dtype == jnp.float64
      # t=0 (first element) differences two CDFs near 1: float64 rounding shows at 1e-7.
      np.testing.assert_allclose(np.asarray(got[k])[0], v[0], rtol=1e-6, err_msg=k)
      np.testing.assert_allclose(np.asarray(got[k])[1:], v[1:], rtol=1e-9, err_msg=k)


@pytest.mark.parametrize("schedule,target,var_type,loss_type,weighting",
                         [c for c in CASES if c[4] in ("constant", "debias")])
def test_training_losses_float32_close_to_float64(schedule, target, var_type, loss_type,
                                                  weighting):
  """The float32 path (what training runs) at well-conditioned steps.

  At t=0 the decoder likelihood differences two CDFs near 1 and at the last cosine
  step x̂0 cancels √ᾱ≈1e-5 against noise: there float32 itself (here and in the
  official PyTorch code) carries errors of 1e-3 and more.
  """
  t = np.array([1, 17, 250, 500, 900, 990], dtype=np.int32)
  got, want = _run_losses(schedule, target, var_type, loss_type, weighting, np.float32, t)
  for k, v in want.items():
    assert got[k].dtype == jnp.float32
    # A KL near 0 is a difference of O(1) terms: float32 leaves ~1e-7 absolute.
    atol = 1e-6 * (T if loss_type == "rescaled_kl" else 1)
    np.testing.assert_allclose(np.asarray(got[k]), v, rtol=1e-4, atol=atol, err_msg=k)


def test_space_target_matches_official_semantics():
  betas = schedules.get_named_beta_schedule("linear", T)
  diff = diffusion_lib.GaussianDiffusion(betas, target="x0")
  x0, noise, t = _inputs(1)
  model = _fake_model(3)
  got = _weighted_terms(diff, "debias", model, x0, t, noise, space="target")
  out = model(diff.q_sample(x0, t, noise), jnp.asarray(t))
  want = _np_losses(betas, "x0", "fixed_small", "mse", "debias", x0, noise, t, out,
                    space="target")
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)


def test_learned_variance_gradient_stops_at_the_mean():
  """The vb term of the hybrid loss trains only the variance channels."""
  betas = schedules.get_named_beta_schedule("linear", T)
  diff = diffusion_lib.GaussianDiffusion(betas, var_type="learned_range",
                                         loss_type="rescaled_mse")
  x0, noise, t = _inputs(2)
  out = jnp.asarray(np.random.default_rng(3).normal(size=SHAPE[:3] + (6,)), jnp.float32)
  g = jax.grad(lambda o: diff.training_losses(lambda *_: o, x0, t, noise)["vb"].sum())(out)
  assert np.all(np.asarray(g[..., :3]) == 0)
  assert np.any(np.asarray(g[..., 3:]) != 0)


def test_xstart_eps_v_identities():
  betas = schedules.get_named_beta_schedule("cosine", T)
  diff = diffusion_lib.GaussianDiffusion(betas)
  x0, noise, t = _inputs(4, t=np.array([0, 5, 100, 400, 700, 990], np.int32))
  x_t = diff.q_sample(x0, t, noise)
  np.testing.assert_allclose(diff.predict_xstart_from_eps(x_t, t, noise), x0, atol=1e-4)
  v = diff.predict_v(x0, t, noise)
  np.testing.assert_allclose(diff.predict_xstart_from_v(x_t, t, v), x0, atol=1e-6)
  np.testing.assert_allclose(diff.predict_eps_from_xstart(x_t, t, x0), noise, atol=1e-4)


def test_vlb_at_t0_and_t_positive():
  betas = schedules.get_named_beta_schedule("linear", T)
  diff = diffusion_lib.GaussianDiffusion(betas, var_type="fixed_large")
  x0, noise, _ = _inputs(5)
  model = _fake_model(3)
  for step in (0, 1, 300):
    t = np.full((SHAPE[0],), step, np.int32)
    x_t = diff.q_sample(x0, t, noise)
    got = diff.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
    out = diff.p_mean_variance(model, x_t, t, clip_denoised=False)
    mean = np.asarray(out["mean"], np.float64)
    var = np.asarray(out["variance"], np.float64)
    if step == 0:
      # Against the exact normal CDF: guided-diffusion's tanh approximation of it
      # costs up to ~1% in the tails (the formula itself is checked in float64 above).
      lo = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
      hi = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
      std = np.sqrt(var)
      p = scipy.stats.norm.cdf(hi, mean, std) - scipy.stats.norm.cdf(lo, mean, std)
      want = -np.log(np.maximum(p, 1e-12)).mean(axis=(1, 2, 3)) / math.log(2)
      np.testing.assert_allclose(got, want, rtol=1e-2)
    else:
      abar = np.cumprod(1 - betas)
      true_mean, true_var, _ = (np.asarray(a, np.float64) for a in
                                diff.q_posterior_mean_variance(x0, x_t, t))
      # KL of two diagonal Gaussians via entropy/cross-entropy, in bits per dimension.
      kl = (np.log(np.sqrt(var) / np.sqrt(true_var))
            + (true_var + (true_mean - mean) ** 2) / (2 * var) - 0.5)
      np.testing.assert_allclose(got, kl.mean(axis=(1, 2, 3)) / math.log(2), rtol=1e-4)
      assert abar[step] < 1


def test_jit_and_vmap():
  betas = schedules.get_named_beta_schedule("linear", T)
  diff = diffusion_lib.GaussianDiffusion(betas, var_type="learned_range",
                                         loss_type="rescaled_mse")
  x0, noise, t = _inputs(6)
  model = _fake_model(6)
  eager = diff.training_losses(model, x0, t, noise)["vb"]
  jitted = jax.jit(lambda d, x, n, tt: d.training_losses(model, x, tt, n)["vb"])(
      diff, x0, noise, t)
  per_example = jax.vmap(
      lambda x, n, tt: diff.training_losses(model, x[None], tt[None], n[None])["vb"][0]
  )(x0, noise, t)
  # The VLB term alone (a KL of O(1) parts): float32 rounding differs at ~1e-6.
  np.testing.assert_allclose(jitted, eager, rtol=1e-5)
  np.testing.assert_allclose(per_example, eager, rtol=1e-5)


def test_respaced_model_sees_original_timesteps():
  diff = diffusion_lib.create_diffusion("linear", 1000, "ddim10")
  seen = []
  x = jnp.zeros((2, 2, 2, 1))

  def model(x_t, t_model):
    seen.append(np.asarray(t_model))
    return jnp.zeros_like(x_t)

  diff.p_mean_variance(model, x, jnp.array([0, 9]))
  np.testing.assert_array_equal(seen[0], [0, 900])
  base = diffusion_lib.create_diffusion("linear", 1000)
  np.testing.assert_allclose(diff.alphas_cumprod[9], base.alphas_cumprod[900], rtol=1e-6)


def _gaussian_data(n=16, seed=7):
  """8-bit data in [−1, 1] drawn from N(μ, s²) per pixel."""
  rng = np.random.default_rng(seed)
  x = np.clip(rng.normal(0.2, 0.3, size=(n, 4, 4, 1)), -1, 1)
  return (np.round((x + 1) * 127.5) / 127.5 - 1).astype(np.float32)


def test_bpd_is_finite_and_lower_for_a_better_model():
  diff = diffusion_lib.create_diffusion("linear", 100, var_type="fixed_small")
  x0 = _gaussian_data()
  mu, s2 = 0.2, 0.3**2
  abar = jnp.asarray(diff.alphas_cumprod)

  def exact_eps(x_t, t):  # the optimal ε-predictor for N(μ, s²) data
    a = jnp.sqrt(abar[t])[:, None, None, None]
    sig = jnp.sqrt(1 - abar[t])[:, None, None, None]
    return sig * (x_t - a * mu) / (a**2 * s2 + sig**2)

  bad_eps = lambda x_t, t: jnp.zeros_like(x_t)
  key = jax.random.PRNGKey(0)
  good = jax.jit(lambda x: diff.calc_bpd_loop(exact_eps, x, key))(x0)
  bad = jax.jit(lambda x: diff.calc_bpd_loop(bad_eps, x, key))(x0)
  assert good["vb"].shape == (16, 100) and good["mse"].shape == (16, 100)
  assert np.all(np.isfinite(good["total_bpd"])) and np.all(np.isfinite(bad["total_bpd"]))
  assert float(good["total_bpd"].mean()) < float(bad["total_bpd"].mean())
  assert float(good["mse"].mean()) < float(bad["mse"].mean())


def test_bad_input():
  betas = schedules.get_named_beta_schedule("linear", 100)
  with pytest.raises(ValueError, match="choose one of .*'v'"):
    diffusion_lib.GaussianDiffusion(betas, target="score")
  with pytest.raises(ValueError, match="'fixed_small'"):
    diffusion_lib.GaussianDiffusion(betas, var_type="learned")
  with pytest.raises(ValueError, match="'rescaled_mse'"):
    diffusion_lib.GaussianDiffusion(betas, loss_type="l1")
  diff = diffusion_lib.GaussianDiffusion(betas, var_type="learned_range")
  x0, noise, t = _inputs()
  with pytest.raises(ValueError, match=r"\(6, 4, 4, 3\); expected \(6, 4, 4, 6\)"):
    diff.training_losses(_fake_model(3), x0, np.minimum(t, 99), noise)


def test_decoder_likelihood_in_float32_matches_float64_including_the_tails():
  """Random model outputs, bins at the edges and deep in both tails: the float32 log
  likelihood is within 1e-5 (relative) of the same formula in float64."""
  rng = np.random.default_rng(0)
  n = 20000
  x = rng.integers(0, 256, n) / 127.5 - 1.0
  means = np.concatenate([rng.uniform(-1, 1, n // 2),                      # ordinary
                          x[n // 2:] + rng.choice([-1, 1], n // 2) * rng.uniform(0.02, 0.3, n // 2)])
  log_scales = rng.uniform(-7.0, 0.0, n)  # σ from 1e-3 (far tails) to 1
  want = -_np_decoder_nll(x, means, 2 * log_scales)
  got = np.asarray(diffusion_lib.discretized_gaussian_log_likelihood(
      jnp.asarray(x, jnp.float32), jnp.asarray(means, jnp.float32),
      jnp.asarray(log_scales, jnp.float32)), np.float64)
  # Inputs rounded to float32 move the float64 value too; compare on those inputs.
  x32, m32, s32 = (np.asarray(np.float32(a), np.float64) for a in (x, means, log_scales))
  want32 = -_np_decoder_nll(x32, m32, 2 * s32)
  rel = np.abs(got - want32) / np.maximum(np.abs(want32), 1e-3)
  assert rel.max() < 1e-5, (rel.max(), x[rel.argmax()], means[rel.argmax()],
                            log_scales[rel.argmax()])
  assert np.mean(want < -5) > 0.2  # the tails were exercised
  del want
