"""A learned loss weighting over log-SNR, after EDM2's uncertainty weighting (Karras et al. 2024).

`weighting="learned"` trains, jointly with the network, a tiny MLP u(λ) of the log-SNR
λ = log SNR(t) on fixed Fourier features, and replaces each example's weighted MSE by

    w₀(t)·mse / exp(u(λ_t)) + u(λ_t)                  (plus the VLB term, unchanged)

where w₀ is `weighting_params.base` (default "debias"). For fixed network error the
optimum is exp(u) = w₀·mse, so u learns the per-noise-level loss scale and the effective
weight w₀/exp(u) equalises the levels' contributions. u starts at 0 (the zeroed output
layer), so training starts as the base weighting. Its params and Adam state (at
`optim.learned_weight_lr`, independent of the model's) are the objective state's
"learned_weight" entry, checkpointed with the run.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.core import objective

NUM_FREQUENCIES = 16
HIDDEN = 32


class LogSNRUncertainty(nn.Module):
  """u(λ): (B,) float32 log-SNR -> (B,) float32. Features cos/sin(λ·f) for fixed f from
  1/64 to 1 (geometric), a SiLU layer of HIDDEN units and a zero-initialised output."""

  @nn.compact
  def __call__(self, log_snr):
    freqs = jnp.asarray(np.geomspace(1 / 64, 1.0, NUM_FREQUENCIES), jnp.float32)
    angles = log_snr.astype(jnp.float32)[:, None] * freqs[None]
    h = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    h = nn.silu(nn.Dense(HIDDEN, name="hidden")(h))
    return nn.Dense(1, kernel_init=nn.initializers.zeros, name="out")(h)[:, 0]


@objective.register("learned")
@dataclasses.dataclass(frozen=True)
class LearnedWeighting:
  """The u-network and its optimiser (Adam at `lr`)."""
  lr: float = 1e-2
  base: str = "debias"
  STATE_KEY = "learned_weight"

  @property
  def module(self) -> LogSNRUncertainty:
    return LogSNRUncertainty()

  @property
  def tx(self) -> optax.GradientTransformation:
    return optax.adam(self.lr)

  def init(self, key) -> dict:
    """{"params", "opt_state"}."""
    params = self.module.init(key, jnp.zeros((1,), jnp.float32))["params"]
    return {"params": params, "opt_state": self.tx.init(params)}

  def trainable(self, state: dict):
    return state["params"]

  def u(self, params, log_snr):
    return self.module.apply({"params": params}, log_snr)

  def per_example_loss(self, params, state, weighted_mse, log_snr):  # pylint: disable=unused-argument
    """w₀·mse/exp(u) + u per example, (B,)."""
    u = self.u(params, log_snr)
    return weighted_mse * jnp.exp(-u) + u

  def update(self, state: dict, grads, t, weighted_mse, log_snr) -> dict:  # pylint: disable=unused-argument
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

  def effective_weight(self, state: dict, base_weight, log_snr) -> np.ndarray:
    """w₀(t)/exp(u(λ_t)) for arrays of the base weight and log-SNR, as numpy."""
    u = self.u(state["params"], jnp.asarray(log_snr, jnp.float32))
    return np.asarray(base_weight) * np.exp(-np.asarray(u, np.float64))
