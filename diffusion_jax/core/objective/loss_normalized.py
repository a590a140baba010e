"""A loss-normalised weighting: each noise level's loss over its own running mean.

`weighting="loss_normalized"` replaces each example's weighted MSE by

    w₀(t)·mse / m(b(λ_t))                              (plus the VLB term, unchanged)

where λ_t = log SNR(t), b(λ) is its bin among NUM_BINS equal bins of [−LOG_SNR_LIMIT,
LOG_SNR_LIMIT] (outer values clipped into the end bins), and m(b) is the running mean of
w₀·mse over bin b: the first batch that reaches a bin sets it, later batches move it by
an exponential moving average with DECAY. m is state, not a parameter (no gradient flows
through it), so every noise level contributes about 1 per example: the fixed point that
the learned weighting's u(λ) approaches by gradient descent, reached by averaging
instead. w₀ is `weighting_params.base` (default "debias"); m starts at 1, so an unseen
bin is weighted as the base weighting.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import objective

NUM_BINS = 48
LOG_SNR_LIMIT = 12.0
DECAY = 0.99


def bin_index(log_snr):
  """(B,) int32 bin of each log-SNR value."""
  width = 2 * LOG_SNR_LIMIT / NUM_BINS
  return jnp.clip(jnp.floor((log_snr + LOG_SNR_LIMIT) / width), 0, NUM_BINS - 1).astype(
      jnp.int32)


@objective.register("loss_normalized")
@dataclasses.dataclass(frozen=True)
class LossNormalizedWeighting:
  """w₀·mse divided by the running mean of w₀·mse in its log-SNR bin."""
  base: str = "debias"
  STATE_KEY = "loss_normalized"

  def init(self, key) -> dict:  # pylint: disable=unused-argument
    """{"mean": (NUM_BINS,) float32 ones, "seen": (NUM_BINS,) int32 zeros}."""
    return {"mean": jnp.ones((NUM_BINS,), jnp.float32),
            "seen": jnp.zeros((NUM_BINS,), jnp.int32)}

  def trainable(self, state):  # pylint: disable=unused-argument
    return None

  def per_example_loss(self, trainable, state, weighted_mse, log_snr):  # pylint: disable=unused-argument
    return weighted_mse / state["mean"][bin_index(log_snr)]

  def update(self, state: dict, grads, t, weighted_mse, log_snr) -> dict:  # pylint: disable=unused-argument
    onehot = jax.nn.one_hot(bin_index(log_snr), NUM_BINS, dtype=jnp.float32)
    count = onehot.sum(0)
    batch_mean = (onehot.T @ weighted_mse.astype(jnp.float32)) / jnp.maximum(count, 1.0)
    moved = jnp.where(state["seen"] > 0, DECAY * state["mean"] + (1 - DECAY) * batch_mean,
                      batch_mean)
    hit = count > 0
    return {"mean": jnp.where(hit, moved, state["mean"]),
            "seen": state["seen"] + hit.astype(jnp.int32)}

  def effective_weight(self, state: dict, base_weight, log_snr) -> np.ndarray:
    """w₀(t)/m(b(λ_t)) for arrays of the base weight and log-SNR, as numpy."""
    mean = np.asarray(state["mean"], np.float64)[np.asarray(
        bin_index(jnp.asarray(log_snr, jnp.float32)))]
    return np.asarray(base_weight, np.float64) / mean
