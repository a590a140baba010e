"""Fixed loss weightings as functions of SNR(t) = ᾱ/(1−ᾱ).

Every weighting is defined once, as the weight w(SNR) on the per-example ε-MSE. A
network that predicts x0 or v is trained on the same objective by converting the
weight exactly, using ‖ε̂−ε‖² = SNR·‖x̂0−x0‖² and ‖v̂−v‖² = (1+SNR)·‖x̂0−x0‖²:

    weight on the x0-MSE = w·SNR,     weight on the v-MSE = w·SNR/(1+SNR).

So "debias" (Yu et al., 2024) means one objective whatever the parametrisation. The
official code instead multiplies the raw weight into the target's own MSE; pass
`space="target"` for parity with it.

Scale: weights are not normalised by default, so a weighting also changes the
effective learning rate. Under the linear schedule with T=1000, the debias weight
1/√SNR has mean ≈ 17.8 over uniform t (the paper trains with it unnormalised).
`normalize=True` divides the ε-weight by its mean under uniform t.

All functions accept numpy arrays (computed in their dtype, float64 for schedule
tables) or jax arrays (jit- and vmap-safe).
"""
from __future__ import annotations

import inspect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

TARGETS = ("eps", "x0", "v")
SPACES = ("eps", "target")


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def constant(snr):
  """w = 1: the plain ε-MSE (Ho et al.), an x0 objective weighted by SNR."""
  return _xp(snr).ones_like(snr)


def debias(snr):
  """w = 1/√SNR (Yu et al., 2024): removes the SNR bias of the ε-MSE."""
  return 1.0 / _xp(snr).sqrt(snr)


def snr(snr):  # pylint: disable=redefined-outer-name
  """w = 1/SNR: the x0-MSE with constant weight."""
  return 1.0 / snr


def p2(snr, k=1.0, gamma=1.0):
  """w = 1/(k+SNR)^γ (Choi et al., 2022)."""
  return 1.0 / (k + snr) ** gamma


def min_snr(snr, gamma=5.0):
  """w = min(SNR, γ)/SNR (Hang et al., 2023), "Min-SNR-γ" for ε-prediction."""
  return _xp(snr).minimum(snr, gamma) / snr


def truncated_snr(snr):
  """w = max(SNR, 1)/SNR (Salimans & Ho, 2022): x0-MSE weighted by max(SNR, 1)."""
  return _xp(snr).maximum(snr, 1.0) / snr


def edm(snr, sigma_data=0.5):
  """Karras et al.'s λ(σ) = (σ²+σ_d²)/(σσ_d)² on the x0-MSE, with σ² = 1/SNR, as an ε-weight.

  Moving it to the ε-MSE divides by SNR: w = (1/SNR + σ_d²)/σ_d².
  """
  return (1.0 / snr + sigma_data**2) / sigma_data**2


def sigmoid(snr, bias=0.0):
  """w = sigmoid(bias − log SNR) (Kingma & Gao, 2023)."""
  if _xp(snr) is jnp:
    return jax.nn.sigmoid(bias - jnp.log(snr))
  return scipy.special.expit(bias - np.log(snr))


_REGISTRY: dict[str, Callable] = {
    "constant": constant,
    "debias": debias,
    "snr": snr,
    "p2": p2,
    "min_snr": min_snr,
    "truncated_snr": truncated_snr,
    "edm": edm,
    "sigmoid": sigmoid,
}


def available() -> list[str]:
  """The registered weighting names."""
  return list(_REGISTRY)


def parameters(name: str) -> dict[str, float]:
  """The tunable parameters of weighting `name` with their defaults."""
  fn = _get(name)
  sig = inspect.signature(fn)
  return {p.name: p.default for p in list(sig.parameters.values())[1:]}


def _get(name: str) -> Callable:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown loss weighting {name!r}; choose one of {available()}.")
  return _REGISTRY[name]


def epsilon_weight(name: str, snr_values, **params):
  """The weighting's raw weight on the ε-MSE; validates `name` and `params`."""
  fn = _get(name)
  allowed = parameters(name)
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    raise ValueError(f"Weighting {name!r} takes parameters {sorted(allowed) or 'none'}; "
                     f"got unknown {unknown}.")
  return fn(snr_values, **params)


def loss_weight(name: str, snr, *, target: str = "eps", space: str = "eps",
                normalize: bool = False, max_weight: float | None = None,
                reference_snr=None, **params):
  """Weight on the MSE of the network's `target` (eps, x0 or v) at the given SNR.

  Args:
    name: a registered weighting (see `available()`).
    snr: SNR(t), any shape; numpy (computed in its own dtype) or jax.
    target: what the network predicts; the ε-weight is converted exactly to it.
    space: "eps" (default) converts as above; "target" applies the raw weight to the
      target's MSE unchanged, as the official Debias code does for x0/v.
    normalize: divide the raw weight by its mean over `reference_snr`, so that it
      averages 1 under uniform t.
    max_weight: clamp the final weight from above.
    reference_snr: per-step SNR of the whole schedule, for `normalize`; defaults to `snr`.
    **params: the weighting's own parameters, e.g. `gamma` for min_snr.
  Returns:
    Array of the shape and kind of `snr`.
  """
  if target not in TARGETS:
    raise ValueError(f"Unknown prediction target {target!r}; choose one of {list(TARGETS)}.")
  if space not in SPACES:
    raise ValueError(f"Unknown weighting space {space!r}; choose one of {list(SPACES)}.")
  if max_weight is not None and not max_weight > 0:
    raise ValueError(f"weighting_params.max_weight={max_weight}: must be > 0 (it caps "
                     "the weight from above), or None for no cap.")
  xp = _xp(snr)
  w = epsilon_weight(name, snr, **params)
  if normalize:
    ref = snr if reference_snr is None else reference_snr
    w = w / xp.mean(epsilon_weight(name, ref, **params))
  if space == "eps" and target == "x0":
    w = w * snr
  elif space == "eps" and target == "v":
    w = w * snr / (1.0 + snr)
  if max_weight is not None:
    w = xp.minimum(w, max_weight)
  return w
