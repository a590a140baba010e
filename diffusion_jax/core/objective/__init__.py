"""The training objective: what each example's loss is, and which t it is drawn at.

One `Objective` holds everything that defines what the network is trained to minimise:

  the weight w(t) on the target's MSE  a fixed weighting by name (`weighting.py`);
  the timestep density p(t)            with its importance weight 1/(T·p(t)) (`tdensity.py`);
  an optional stateful term            a weighting that keeps state (e.g. `learned.py`),
                                       one file each, registered by name with `register`.

Its state (the density's loss history and the term's state) is one pytree, kept in
`TrainState.objective_state` and so checkpointed. The train step calls `sample_t`,
`loss` (differentiated with respect to the network's params and `trainable(state)`) and
`update`; it knows nothing of any weighting.

A stateful term is a class registered under the weighting's name. Its instances have
`STATE_KEY` (where its state sits in the objective state), a `base` weighting (its
fixed part w₀), and:
  init(key) -> state;
  trainable(state) -> the pytree differentiated with the network (None: nothing);
  per_example_loss(trainable, state, weighted_mse, log_snr) -> (B,) from w₀·mse;
  update(state, grads, t, weighted_mse, log_snr) -> state (grads: of `trainable`);
  effective_weight(state, base_weight, log_snr) -> (T,) numpy, the weight on the MSE.
Its constructor takes `base` and any of the objective options (today: `lr`).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core.objective import tdensity as tdensity_lib
from diffusion_jax.core.objective import weighting as weighting_lib

_TERMS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: the stateful weighting `name` (a `diffusion.weighting` value)."""
  def add(cls):
    if name in _TERMS or name in weighting_lib.available():
      raise ValueError(f"A weighting named {name!r} is already registered.")
    _TERMS[name] = cls
    return cls
  return add


def available() -> list[str]:
  """Every weighting name: the fixed ones, then the stateful ones."""
  return weighting_lib.available() + sorted(_TERMS)


def weight_table(name: str, snr, target: str = "eps", **params) -> np.ndarray:
  """(T,) float64 weight on the MSE of `target` for weighting `name` over a schedule's
  per-step `snr`; params: the weighting's own, plus space, normalize and max_weight (see
  weighting.loss_weight). A stateful weighting's table is that of its `base`. Raises
  ValueError naming the steps where a weight is not finite, or negative weights."""
  params = dict(params)
  if name in _TERMS:
    name = params.pop("base", None) or "debias"
    if name in _TERMS:
      raise ValueError(f"weighting_params.base cannot be a stateful weighting ({name!r}); "
                       "name a fixed weighting such as 'debias'.")
  snr = np.asarray(snr, np.float64)
  weight = np.asarray(weighting_lib.loss_weight(name, snr, target=target, reference_snr=snr,
                                                **params), np.float64)
  bad = np.flatnonzero(~np.isfinite(weight))
  if bad.size:
    raise ValueError(
        f"Loss weighting {name!r} with {params} is not finite at steps {bad[:8].tolist()} "
        f"(SNR there: {snr[bad[:3]].tolist()}); set weighting_params.max_weight or use a "
        "schedule whose SNR stays in (0, ∞).")
  negative = np.flatnonzero(weight < 0)
  if negative.size or not np.any(weight > 0):
    where = (f"negative at steps {negative[:8].tolist()} (e.g. {weight[negative[0]]:.4g})"
             if negative.size else "zero at every step")
    raise ValueError(
        f"Loss weighting (diffusion.weighting) {name!r} with weighting_params {params} is "
        f"{where}: a negative weight trains the network away from the data and an all-zero "
        "one trains nothing. Weights must be finite and ≥ 0 with some > 0: keep min_snr's "
        "and p2's gamma and p2's k positive and finite, and max_weight > 0.")
  return weight


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
  """The loss and timestep density of one training run (build it with `build`).

  diffusion: the forward process and its loss terms. loss_weight: (T,) float64 weight on
  the target's MSE. tdensity: the timestep density. term: the stateful weighting, or None.
  """
  diffusion: Any
  loss_weight: np.ndarray
  tdensity: tdensity_lib.TimestepDensity
  term: Any = None

  def init(self, key) -> dict:
    """The objective state: the density's loss history and the term's state."""
    state = self.tdensity.init()
    if self.term is not None:
      state[self.term.STATE_KEY] = self.term.init(jax.random.fold_in(key, 1))
    return state

  def trainable(self, state: dict):
    """The part of `state` differentiated with the network (None when nothing is)."""
    return None if self.term is None else self.term.trainable(state[self.term.STATE_KEY])

  def sample_t(self, state: dict, key, batch_size: int):
    """(t (B,) int32, importance weights (B,) float32) from the timestep density."""
    return self.tdensity.sample(state, key, batch_size)

  def loss(self, model_fn, trainable, state: dict, images, t, weights, noise):
    """(scalar loss, per-example terms) for one batch.

    images, noise: (B, H, W, C); t, weights: (B,) from `sample_t`. Terms, each (B,):
    `mse`, the weighted MSE w(t)·mse; `vb`, the VLB term when the loss has one; `loss`.
    With a kl loss type the loss is the VLB alone and `mse` is unweighted (for logs).
    """
    terms = self.diffusion.training_losses(model_fn, images, t, noise)
    if self.diffusion.loss_type in ("kl", "rescaled_kl"):
      terms["loss"] = terms["vb"]
    else:
      dtype = jnp.promote_types(terms["mse"].dtype, jnp.float32)
      terms["mse"] = jnp.asarray(self.loss_weight, dtype)[t] * terms["mse"]
      per_example = terms["mse"]
      if self.term is not None:
        per_example = self.term.per_example_loss(
            trainable, state[self.term.STATE_KEY], terms["mse"], self._log_snr(t))
      terms["loss"] = per_example + terms.get("vb", 0.0)
    return jnp.mean(terms["loss"] * weights), terms

  def update(self, state: dict, t, terms: dict, grads) -> dict:
    """The state after a step with timesteps `t`, per-example `terms` (from `loss`) and
    `grads` of `trainable(state)`."""
    new = self.tdensity.update({k: v for k, v in state.items()
                                if self.term is None or k != self.term.STATE_KEY},
                               t, jax.lax.stop_gradient(terms["loss"]))
    if self.term is not None:
      key = self.term.STATE_KEY
      new[key] = self.term.update(state[key], grads, t, jax.lax.stop_gradient(terms["mse"]),
                                  self._log_snr(t))
    return new

  def effective_weight(self, state: dict | None = None) -> np.ndarray:
    """(T,) float64 weight on the target's MSE at every step, the term's included."""
    if self.term is None:
      return np.asarray(self.loss_weight, np.float64)
    return self.term.effective_weight(state[self.term.STATE_KEY], self.loss_weight,
                                      np.asarray(self.diffusion.log_snr))

  def _log_snr(self, t):
    return jnp.asarray(self.diffusion.log_snr, jnp.float32)[t]


def build(diffusion, weighting: str = "constant", weighting_params: dict | None = None,
          timestep_density: str = "uniform", density_params: dict | None = None,
          density_is_weight: bool = False, **options) -> Objective:
  """The objective for `diffusion`: weighting `weighting` (see `available()`) with its
  params, drawn under `timestep_density` (see tdensity) with its params. options: the
  stateful term's settings (`lr`)."""
  if weighting not in available():
    raise ValueError(f"Unknown loss weighting {weighting!r}; choose one of {available()}.")
  params = dict(weighting_params or {})
  table = weight_table(weighting, diffusion.snr, diffusion.target, **params)
  density = tdensity_lib.TimestepDensity.for_tables(
      timestep_density, table, diffusion.log_snr, density_is_weight=density_is_weight,
      **(density_params or {}))
  term = None
  if weighting in _TERMS:
    if diffusion.loss_type not in ("mse", "rescaled_mse"):
      raise ValueError(f"diffusion.weighting={weighting!r} weights the MSE term; "
                       f"loss_type={diffusion.loss_type!r} has none. Use mse or "
                       "rescaled_mse.")
    cls = _TERMS[weighting]
    fields = {f.name for f in dataclasses.fields(cls)}
    term = cls(**{k: v for k, v in options.items() if k in fields},
               **({"base": params["base"]} if params.get("base") else {}))
  return Objective(diffusion, table, density, term)


for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")
