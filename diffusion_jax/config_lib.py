"""Config validation and the objects a config describes (model, diffusion, optimiser).

Validation runs before anything is compiled, and raises one ValueError naming the
field, the problem and the fix.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import input_pipeline
from diffusion_jax import models
from diffusion_jax import resample
from diffusion_jax import weighting as weighting_lib

COMPUTE_DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("halt", "skip")
# Fields that change what a checkpoint means or its structure.
_CHECKPOINT_FIELDS = {"model": None,
                      "diffusion": ("schedule", "num_timesteps", "target", "var_type"),
                      "optim": ("ema_rates",)}


def _default_config():
  from configs import default  # pylint: disable=import-outside-toplevel
  return default.get_config()


def _unknown_fields(config, reference, prefix="") -> list[str]:
  out = []
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      out.append(name)
    elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(
        reference[key], ml_collections.ConfigDict):
      out += _unknown_fields(config[key], reference[key], name + ".")
  return out


def weighting_params(config) -> dict:
  """The weighting's parameters from config.diffusion.weighting_params, Nones dropped."""
  return {k: v for k, v in config.diffusion.weighting_params.items() if v is not None}


def validate_config(config, num_devices: int | None = None) -> None:
  """Raises ValueError for the first problem found in `config`."""
  unknown = _unknown_fields(config, _default_config())
  if unknown:
    raise ValueError(f"Unknown config field(s) {unknown}; see configs/default.py for "
                     "every field.")
  d = config.diffusion
  diffusion_lib._check_choice("prediction target", d.target, diffusion_lib.TARGETS)  # pylint: disable=protected-access
  diffusion_lib._check_choice("variance type", d.var_type, diffusion_lib.VAR_TYPES)  # pylint: disable=protected-access
  diffusion_lib._check_choice("loss type", d.loss_type, diffusion_lib.LOSS_TYPES)  # pylint: disable=protected-access
  resample.TimestepSampler(d.timestep_sampler, d.num_timesteps)
  params = weighting_params(config)
  weighting_lib.loss_weight(d.weighting, np.array([0.5, 2.0]), target=d.target, **params)
  if config.model.learn_sigma != (d.var_type == "learned_range"):
    raise ValueError(f"model.learn_sigma={config.model.learn_sigma} conflicts with "
                     f"diffusion.var_type={d.var_type!r}: a learned variance needs "
                     "learn_sigma=True, a fixed one learn_sigma=False.")
  input_pipeline.check_dataset_name(config.data.dataset)
  if config.model.image_size != config.data.image_size:
    raise ValueError(f"model.image_size={config.model.image_size} differs from "
                     f"data.image_size={config.data.image_size}; set them equal.")
  models.parse_channel_mult(config.model.channel_mult, config.model.image_size)
  if config.train.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"Unknown train.compute_dtype {config.train.compute_dtype!r}; choose "
                     f"one of {list(COMPUTE_DTYPES)}.")
  if config.train.nan_policy not in NAN_POLICIES:
    raise ValueError(f"Unknown train.nan_policy {config.train.nan_policy!r}; choose one of "
                     f"{list(NAN_POLICIES)}.")
  for field in ("num_steps", "log_every", "checkpoint_every"):
    if config.train[field] < 1:
      raise ValueError(f"train.{field} must be at least 1, got {config.train[field]}.")
  n = jax.device_count() if num_devices is None else num_devices
  accum = config.optim.grad_accum_steps
  if accum < 1 or config.data.batch_size % accum:
    raise ValueError(f"data.batch_size={config.data.batch_size} does not divide into "
                     f"optim.grad_accum_steps={accum} micro-batches.")
  if (config.data.batch_size // accum) % n:
    raise ValueError(f"The micro-batch of {config.data.batch_size // accum} "
                     f"(data.batch_size / optim.grad_accum_steps) does not divide across "
                     f"{n} devices; use a multiple of {n}.")
  if n % config.train.fsdp:
    raise ValueError(f"train.fsdp={config.train.fsdp} does not divide {n} devices.")
  if not config.optim.ema_rates or any(not 0 <= r < 1 for r in config.optim.ema_rates):
    raise ValueError(f"optim.ema_rates={config.optim.ema_rates} must be a non-empty list "
                     "of rates in [0, 1).")


def build_model(config):
  kw = dict(config.model)
  kw["dtype"] = config.train.compute_dtype
  kw["attention_impl"] = config.train.get("attention", "einsum")
  return models.create_model(**kw)


def build_diffusion(config) -> diffusion_lib.GaussianDiffusion:
  d = config.diffusion
  return diffusion_lib.create_diffusion(
      d.schedule, d.num_timesteps, target=d.target, var_type=d.var_type,
      loss_type=d.loss_type, weighting=d.weighting, weighting_params=weighting_params(config))


def build_timestep_sampler(config) -> resample.TimestepSampler:
  return resample.TimestepSampler(config.diffusion.timestep_sampler,
                                  config.diffusion.num_timesteps)


def learning_rate_schedule(config):
  o = config.optim
  if o.warmup_steps > 0:
    return optax.linear_schedule(0.0, o.lr, o.warmup_steps)
  return optax.constant_schedule(o.lr)


class Components(NamedTuple):
  """What a training config builds: the network, the diffusion, the optimiser, the t-sampler."""
  model: Any
  diffusion: diffusion_lib.GaussianDiffusion
  tx: optax.GradientTransformation
  timestep_sampler: resample.TimestepSampler


def build(config) -> Components:
  return Components(build_model(config), build_diffusion(config), build_optimizer(config),
                    build_timestep_sampler(config))


def build_optimizer(config) -> optax.GradientTransformation:
  """AdamW with optional warmup and global-norm clipping."""
  o = config.optim
  schedule = learning_rate_schedule(config)
  steps = []
  if o.grad_clip > 0:
    steps.append(optax.clip_by_global_norm(o.grad_clip))
  steps.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay))
  return optax.chain(*steps)


def to_json(config) -> str:
  return config.to_json(sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def model_mismatches(saved: dict, config) -> list[str]:
  """Fields that make a checkpoint saved under config `saved` (a dict) unusable here."""
  diffs = []
  current = json.loads(to_json(config))
  for section, keys in _CHECKPOINT_FIELDS.items():
    old, new = saved.get(section, {}), current[section]
    for key in sorted(keys or set(old) | set(new)):
      a, b = old.get(key), new.get(key)
      if isinstance(a, list) or isinstance(b, list):
        a, b = list(a or []), list(b or [])
      if a != b:
        diffs.append(f"{section}.{key}: checkpoint {a!r}, config {b!r}")
  return diffs
