"""Timestep samplers for training: uniform, and guided-diffusion's loss-second-moment.

Each sampler is pure: its state is a small pytree kept in the train state (and so in
checkpoints), `sample` draws t with importance weights, `update` folds in the losses
of a step. Both kinds share one state layout, so switching sampler never changes the
checkpoint's structure.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


@dataclasses.dataclass(frozen=True)
class TimestepSampler:
  """Draws training timesteps t ∈ [0, T) with importance weights 1/(T·p(t)).

  `loss-second-moment` (Nichol & Dhariwal) samples t ∝ √E[L_t²] over the last
  `history_per_term` losses of each t, mixed with `uniform_prob` of the uniform, once
  every t has a full history; until then it samples uniformly.
  """
  name: str
  num_timesteps: int
  history_per_term: int = 10
  uniform_prob: float = 0.001

  def __post_init__(self):
    if self.name not in TIMESTEP_SAMPLERS:
      raise ValueError(f"Unknown timestep sampler {self.name!r}; choose one of "
                       f"{list(TIMESTEP_SAMPLERS)}.")

  def init(self) -> dict:
    return {"loss_history": jnp.zeros((self.num_timesteps, self.history_per_term),
                                      jnp.float32),
            "loss_counts": jnp.zeros((self.num_timesteps,), jnp.int32)}

  def probabilities(self, state: dict) -> jax.Array:
    """p(t), shape (T,)."""
    uniform = jnp.full((self.num_timesteps,), 1.0 / self.num_timesteps)
    if self.name == "uniform":
      return uniform
    warmed_up = jnp.all(state["loss_counts"] == self.history_per_term)
    w = jnp.sqrt(jnp.mean(state["loss_history"] ** 2, axis=-1))
    w = w / jnp.sum(w)
    w = w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
    return jnp.where(warmed_up, w, uniform)

  def sample(self, state: dict, key: jax.Array, batch_size: int):
    """(t (B,) int32, weights (B,) float32) with E[weight·L_t] = the uniform mean."""
    p = self.probabilities(state)
    if self.name == "uniform":
      t = jax.random.randint(key, (batch_size,), 0, self.num_timesteps, dtype=jnp.int32)
    else:
      t = jax.random.choice(key, self.num_timesteps, (batch_size,), p=p).astype(jnp.int32)
    return t, (1.0 / (self.num_timesteps * p[t])).astype(jnp.float32)

  def update(self, state: dict, t: jax.Array, losses: jax.Array) -> dict:
    """Appends each (t_i, loss_i) in order, dropping the oldest when a history is full."""
    if self.name == "uniform":
      return state

    def add(st, tl):
      ti, li = tl
      hist, counts = st["loss_history"], st["loss_counts"]
      full = counts[ti] == self.history_per_term
      shifted = jnp.concatenate([hist[ti, 1:], li[None]])
      appended = hist[ti].at[jnp.minimum(counts[ti], self.history_per_term - 1)].set(li)
      hist = hist.at[ti].set(jnp.where(full, shifted, appended))
      counts = counts.at[ti].set(jnp.minimum(counts[ti] + 1, self.history_per_term))
      return {"loss_history": hist, "loss_counts": counts}, None

    state, _ = jax.lax.scan(add, state, (t, losses.astype(jnp.float32)))
    return state
