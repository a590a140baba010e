"""EMA profiles of the params, and EDM2's post-hoc EMA.

A run keeps one EMA per config.optim.ema_rates entry (ema ← r·ema + (1 − r)·θ) and,
with config.train.posthoc_ema, one power-function EMA per listed σ_rel (Karras et al.
2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3).
After t steps a power-function EMA weighs the params of step τ ∝ τ^γ (τ ≤ t): the update
β_t = (1 − 1/t)^(γ+1) gives step k the weight (k/t)^(γ+1) − ((k−1)/t)^(γ+1), exactly that
profile integrated over the step. σ_rel, the profile's std over its length, is
√((γ+1)/((γ+2)²(γ+3))). They follow the constant-rate ones in TrainState.ema_params.

Their snapshots are saved every train.posthoc_ema_every steps to
WORKDIR/posthoc_ema/snapshots/<step>.npz. `reconstruct` finds the combination of
snapshots whose profile is nearest (L2 over τ) to the power-function profile of any
σ_rel at the last snapshot, and writes its params to WORKDIR/posthoc_ema/sigma_rel_<σ>.npz,
which sample.posthoc_ema selects.
"""
from __future__ import annotations

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import paths

# σ_rel of the power function with γ = 0 (uniform weights): larger ones have γ < 0.
MAX_SIGMA_REL = 12 ** -0.5
SNAPSHOTS = "posthoc_ema/snapshots"


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The exponent γ > 0 whose profile has relative std `sigma_rel` in (0, 12^−½)."""
  if not 0 < sigma_rel < MAX_SIGMA_REL:
    raise ValueError(f"σ_rel={sigma_rel!r} must lie in (0, {MAX_SIGMA_REL:.4f}) "
                     "(EDM2 uses 0.05–0.15).")
  s2 = sigma_rel ** 2  # (γ+2)²(γ+3)·σ² = γ+1, a cubic in γ; its largest real root
  roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
  return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
  return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_decay(gamma: float, t):
  """β_t = (1 − 1/t)^(γ+1) after t ≥ 1 updates (0 at t = 1: the EMA starts at θ_1)."""
  return (1 - 1 / t) ** (gamma + 1)


def decays(rates, gammas, step) -> list:
  """The decay of each EMA in TrainState.ema_params order for the update that makes
  `step` (int32 scalar, steps before it) + 1 steps: the rates as given (Python floats),
  then the power-function EMAs' float32 β_t."""
  t = jnp.asarray(step).astype(jnp.float32) + 1
  return list(rates) + [power_decay(g, t) for g in gammas]


def _profile_inner(t_a, g_a, t_b, g_b):
  """∫ p_a(τ)·p_b(τ) dτ of normalised power profiles p(τ) = (γ+1)τ^γ/t^(γ+1) on [0, t]
  (float64, broadcast)."""
  t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, g_a, t_b, g_b))
  low = np.minimum(t_a, t_b)
  return ((g_a + 1) * (g_b + 1) * low ** (g_a + g_b + 1)
          / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1)))


def coefficients(snap_steps, snap_gammas, step: int, gamma: float):
  """Least-squares weights x of the snapshots (profile γ_i ending at step t_i) whose sum
  is nearest the profile (γ, step), and that fit's relative L2 error."""
  t_in, g_in = np.asarray(snap_steps, np.float64), np.asarray(snap_gammas, np.float64)
  gram = _profile_inner(t_in[:, None], g_in[:, None], t_in[None], g_in[None])
  target = _profile_inner(t_in, g_in, step, gamma)
  x = np.linalg.lstsq(gram, target, rcond=None)[0]
  norm2 = _profile_inner(step, gamma, step, gamma)
  residual2 = max(float(x @ gram @ x - 2 * x @ target + norm2), 0.0)
  return x, float(np.sqrt(residual2 / norm2))


def _flat(params) -> dict:
  return flax.traverse_util.flatten_dict(params, sep="/")


def _host(tree):
  """Every leaf of `tree` as a host numpy array (gathered across processes if needed)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_map(
      lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)
                           if isinstance(x, jax.Array) and not x.is_fully_addressable
                           else x), tree)


def save_snapshot(workdir, step: int, profiles: list) -> None:
  """The power-function EMAs' params at `step` (written by process 0)."""
  arrays = {f"{i}/{k}": v for i, params in enumerate(_host(profiles))
            for k, v in _flat(params).items()}
  if jax.process_index() == 0:
    paths.save_npz(paths.path(workdir) / SNAPSHOTS / f"{step:09d}.npz", **arrays)


def snapshot_steps(workdir) -> list[int]:
  folder = paths.path(workdir) / SNAPSHOTS
  if not paths.isdir(folder):
    return []
  return sorted(int(f.name[:-4]) for f in folder.iterdir()
                if f.name.endswith(".npz") and f.name[:-4].isdigit())


def _checked(arrays: dict, template: dict, where: str) -> dict:
  """`arrays` when its names, shapes and dtypes are `template`'s, else a ValueError."""
  if set(arrays) != set(template):
    raise ValueError(f"{where} does not hold this model's params (names differ: e.g. "
                     f"{sorted(set(arrays) ^ set(template))[:3]}); remove it.")
  for k, v in template.items():
    if arrays[k].shape != v.shape or arrays[k].dtype != v.dtype:
      raise ValueError(f"{where}: {k} is {arrays[k].dtype}{arrays[k].shape}, the model's "
                       f"is {v.dtype}{v.shape}; remove it.")
  return arrays


def _param_bytes(template: dict) -> int:
  return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in template.values())


def reconstruct_params(workdir, sigma_rels, abstract_params, sigma_rel: float,
                       step: int | None = None):
  """(params, summary) of the post-hoc EMA of `sigma_rel` at `step` (default: the last
  snapshot) from the snapshots of the run's profiles `sigma_rels`; abstract_params: the
  model's params (shapes and dtypes). summary: {"step", "fit_error", "weights",
  "snapshots"}."""
  gamma = sigma_rel_to_gamma(sigma_rel)
  steps = [s for s in snapshot_steps(workdir) if step is None or s <= step]
  if not steps:
    raise FileNotFoundError(
        f"No post-hoc EMA snapshots in {paths.path(workdir) / SNAPSHOTS}"
        + ("" if step is None else f" up to step {step}")
        + ": train with train.posthoc_ema set (e.g. '(0.05, 0.1)').")
  end = steps[-1] if step is None else step
  gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
  weights, error = coefficients(np.repeat(steps, len(gammas)),
                                np.tile(gammas, len(steps)), end, gamma)
  template = _flat(abstract_params)
  wanted = {f"{i}/{k}": v for i in range(len(gammas)) for k, v in template.items()}
  total = {k: np.zeros(v.shape, np.float64) for k, v in template.items()}
  for n, s in enumerate(steps):
    file = paths.path(workdir) / SNAPSHOTS / f"{s:09d}.npz"
    arrays = _checked(paths.load_npz(file, max_bytes=_param_bytes(wanted) + 2**20), wanted,
                      os.fspath(file))
    for i in range(len(gammas)):
      w = weights[n * len(gammas) + i]
      for k in template:
        total[k] += w * arrays[f"{i}/{k}"]
  params = flax.traverse_util.unflatten_dict(
      {k: v.astype(template[k].dtype) for k, v in total.items()}, sep="/")
  return params, {"step": end, "fit_error": error, "weights": weights.tolist(),
                  "snapshots": steps}


def reconstruct(workdir, sigma_rels, abstract_params, sigma_rel: float,
                step: int | None = None) -> dict:
  """`reconstruct_params`, written to WORKDIR/posthoc_ema/sigma_rel_<σ>.npz (by process
  0); returns its summary with "path"."""
  params, summary = reconstruct_params(workdir, sigma_rels, abstract_params, sigma_rel, step)
  out = paths.path(workdir) / "posthoc_ema" / f"sigma_rel_{sigma_rel:g}.npz"
  if jax.process_index() == 0:
    paths.save_npz(out, __step__=np.int64(summary["step"]), **_flat(params))
  return {**summary, "path": os.fspath(out)}


def load_reconstructed(workdir, sigma_rel: float, abstract_params):
  """(params, step) of the post-hoc EMA `reconstruct` wrote for `sigma_rel`."""
  file = paths.path(workdir) / "posthoc_ema" / f"sigma_rel_{sigma_rel:g}.npz"
  if not paths.exists(file):
    raise FileNotFoundError(
        f"No post-hoc EMA for σ_rel={sigma_rel:g} in {workdir}: run --mode=posthoc_ema "
        f"--config.sample.posthoc_ema={sigma_rel:g} first.")
  template = _flat(abstract_params)
  arrays = paths.load_npz(file, max_bytes=_param_bytes(template) + 2**20)
  step = int(arrays.pop("__step__", -1))
  return flax.traverse_util.unflatten_dict(
      _checked(arrays, template, os.fspath(file)), sep="/"), step
