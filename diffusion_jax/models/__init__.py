"""Denoising networks by name, and the one way the rest of the system calls them.

Every module in this package that defines `ARCHITECTURE_NAME` is an architecture and
provides:
  CONFIG_FIELDS               config.model's fields and defaults (with `name`);
  create(**kwargs)            the model from its own constructor arguments;
  from_config(fields, dtype, attention_impl)   the model config.model describes;
  init_params(model, key, batch_size)          float32 params;
  TORCH_CONV1D, torch_constants(model), mismatch_hints(...)   for `convert`.
Its model is called as `model.apply({"params": p}, x_nhwc, t, y=None, train=False,
rngs={"dropout": k})` and returns (B, H, W, out_channels) float32. Adding an
architecture therefore means adding its module (plus a config and a test); nothing
here or elsewhere changes.

Fields every architecture's config has, because the data, sampling and evaluation
code reads them: image_size, in_channels, learn_sigma, class_cond, num_classes.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Callable

import jax

from diffusion_jax.models.layers import ATTENTION_IMPLS
from diffusion_jax.models.unet import UNetModel
from diffusion_jax.models.unet import parse_channel_mult

DEFAULT_ARCHITECTURE = "adm_unet"
COMMON_FIELDS = ("image_size", "in_channels", "learn_sigma", "class_cond", "num_classes")


def _discover() -> dict[str, ModuleType]:
  found = {}
  for info in pkgutil.iter_modules(__path__):
    module = importlib.import_module(f"{__name__}.{info.name}")
    name = getattr(module, "ARCHITECTURE_NAME", None)
    if name:
      found[name] = module
  return found


ARCHITECTURES = _discover()


def architecture(name: str) -> ModuleType:
  """The architecture module registered as `name`."""
  if name not in ARCHITECTURES:
    raise ValueError(f"Unknown model.name {name!r}; choose one of {sorted(ARCHITECTURES)}.")
  return ARCHITECTURES[name]


def architecture_of(model) -> ModuleType:
  """The architecture module that built `model` (a denoiser, or the noisy classifier of
  `models.classifier`, which `convert` also reads)."""
  from diffusion_jax.models import classifier  # pylint: disable=import-outside-toplevel
  for module in list(ARCHITECTURES.values()) + [classifier]:
    if type(model).__module__ == module.__name__:
      return module
  raise TypeError(f"{type(model).__name__} is not a registered architecture's model.")


def name_of(model_config) -> str:
  """config.model's architecture name (configs saved before names existed are UNets)."""
  return dict(model_config).get("name", DEFAULT_ARCHITECTURE)


def config_fields(name: str = DEFAULT_ARCHITECTURE) -> dict:
  """A fresh copy of the architecture's config fields and defaults."""
  return dict(architecture(name).CONFIG_FIELDS)


def validate_model_config(model_config) -> None:
  """ValueError naming any unknown or missing field of config.model, or a bad value."""
  fields = dict(model_config)
  name = name_of(fields)
  known = set(config_fields(name))
  unknown = sorted(set(fields) - known - {"name"})
  if unknown:
    raise ValueError(f"Unknown model field(s) {unknown} for model.name={name!r}; its "
                     f"fields are {sorted(known - {'name'})}.")
  missing = sorted(set(COMMON_FIELDS) - set(fields))
  if missing:
    raise ValueError(f"config.model lacks {missing}; start from models.config_fields"
                     f"({name!r}).")
  from_config(fields, "float32", "einsum")  # the constructor's own checks


def create_model(*args, name: str = DEFAULT_ARCHITECTURE, **kwargs):
  """A model from the architecture's own constructor arguments: guided-diffusion's
  `create_model` arguments for "adm_unet" (the default), DiT's for "dit"."""
  return architecture(name).create(*args, **kwargs)


def from_config(model_config, dtype: str = "float32", attention_impl: str = "einsum"):
  """The model that config.model describes, computing in `dtype`."""
  fields = dict(model_config)
  return architecture(name_of(fields)).from_config(fields, dtype, attention_impl)


def init_params(model, key, batch_size: int = 1):
  """Float32 parameters for `model` (a pytree), for any registered architecture."""
  return architecture_of(model).init_params(model, key, batch_size)


def bind(model, params, labels=None, *, train: bool = False,
         dropout_key: jax.Array | None = None) -> Callable:
  """model_fn(x, t) -> model output: `model` applied with `params` and class `labels`
  (None for an unconditional model). train=True enables dropout (and DiT's label
  dropout), drawing from `dropout_key`."""
  rngs = {"dropout": dropout_key} if dropout_key is not None else None

  def model_fn(x, t):
    return model.apply({"params": params}, x, t, labels, train=train, rngs=rngs)

  return model_fn


__all__ = ["ARCHITECTURES", "ATTENTION_IMPLS", "COMMON_FIELDS", "UNetModel", "architecture",
           "architecture_of", "bind", "config_fields", "create_model", "from_config",
           "init_params", "name_of", "parse_channel_mult", "validate_model_config"]
