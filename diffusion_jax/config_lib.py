"""Config validation and the objects a config describes (model, diffusion, optimiser).

Validation runs before anything is compiled, and raises one ValueError naming the
field, the problem and the fix.
"""
from __future__ import annotations

import json
import math
from typing import Any
from typing import NamedTuple

import jax
import ml_collections
import optax

from diffusion_jax import ema
from diffusion_jax import models
from diffusion_jax.core import diffusion as diffusion_lib
from diffusion_jax.core import objective as objective_lib
from diffusion_jax.data import sources
from diffusion_jax.sampling import samplers

COMPUTE_DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("halt", "skip")

def _default_config():
  from diffusion_jax.configs import defaults  # pylint: disable=import-outside-toplevel
  return defaults.get_config()


def _unknown_fields(config, reference, prefix="") -> list[str]:
  out = []
  for key in config.keys():
    name = f"{prefix}{key}"
    if name == "model":  # checked per architecture (models.validate_model_config)
      continue
    if key not in reference:
      out.append(name)
    elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(
        reference[key], ml_collections.ConfigDict):
      out += _unknown_fields(config[key], reference[key], name + ".")
  return out


class ConfigError(ValueError):
  """A config field with an unusable value (the message names the field and the fix)."""


def int_list(text: str, field: str) -> list[int]:
  """'10,20,50' -> [10, 20, 50] (sorted, unique); ConfigError names `field` otherwise."""
  try:
    values = [int(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise ConfigError(f"config.{field}={text!r}: expected comma-separated positive "
                      "integers, e.g. '10,20,50'.")
  return sorted(set(values))


def float_list(text: str, field: str) -> list[float]:
  """'1,1.5,4' -> [1.0, 1.5, 4.0] (sorted, unique; may be empty); ConfigError names
  `field` otherwise."""
  try:
    values = [float(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    raise ConfigError(f"config.{field}={text!r}: expected comma-separated numbers, e.g. "
                      "'1,1.5,4'.") from None
  if not all(math.isfinite(v) for v in values):
    raise ConfigError(f"config.{field}={text!r}: every value must be finite.")
  return sorted(set(values))


def name_list(text: str) -> list[str]:
  return [v.strip() for v in str(text).split(",") if v.strip()]


def _require(ok: bool, field: str, value, need: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {need}.")


def _ema_choice(value, field: str) -> None:
  _require(value == -1 or (math.isfinite(value) and 0 <= value < 1), field, value,
           "must be -1 (the first EMA) or one of optim.ema_rates")


def _validate_classifier_fields(config) -> None:
  """config.classifier (--mode=train_classifier and classifier guidance)."""
  c = config.get("classifier")
  if c is None:
    return
  for name in ("width", "depth", "num_head_channels", "num_steps", "log_every",
               "checkpoint_every"):
    _require(isinstance(c[name], int) and c[name] >= 1, f"classifier.{name}", c[name],
             "must be a positive integer")
  _require(c.width % 32 == 0, "classifier.width", c.width,
           "must be a multiple of 32 (GroupNorm's 32 groups)")
  _require(c.pool in ("attention", "adaptive"), "classifier.pool", c.pool,
           "choose 'attention' or 'adaptive'")
  _require(math.isfinite(c.lr) and c.lr > 0, "classifier.lr", c.lr, "must be > 0")
  _require(math.isfinite(c.weight_decay) and c.weight_decay >= 0, "classifier.weight_decay",
           c.weight_decay, "must be ≥ 0")
  int_list(c.attention_resolutions, "classifier.attention_resolutions")
  try:
    ok = all(float(v) > 0 for v in str(c.channel_mult).split(",")) if c.channel_mult else True
  except ValueError:
    ok = False
  _require(ok, "classifier.channel_mult", c.channel_mult,
           "comma-separated positive multipliers, e.g. '1,2,2', or '' for the default")


def validate_classifier(config) -> None:
  """config.classifier against the data's image size, where a classifier is trained,
  imported or used (not for every run: the defaults are guided-diffusion's, for 64 px
  and up)."""
  _validate_classifier_fields(config)
  c, size = config.classifier, config.data.image_size
  _require(all(size % r == 0 for r in int_list(c.attention_resolutions, "")),
           "classifier.attention_resolutions", c.attention_resolutions,
           f"each must divide data.image_size={size}")
  try:
    models.parse_channel_mult(c.channel_mult, size)
  except ValueError as e:
    raise ConfigError(f"config.classifier.channel_mult={c.channel_mult!r}: {e}") from None


def validate_sample_fields(config) -> None:
  """config.sample, checked before training so a bad sampler cannot lose a run's end."""
  s = config.sample
  samplers.SamplerOptions.from_config(s).check("sample")
  m = config.model
  _require(s.guidance_scale == 1 or (m.class_cond and m.get("class_dropout_prob", 0) > 0),
           "sample.guidance_scale", s.guidance_scale,
           "needs a class-conditional model trained with label dropout to a null class "
           "(model.class_dropout_prob > 0); set it to 1")
  for name in ("num_samples", "batch_size"):
    _require(isinstance(s[name], int) and s[name] >= 1, f"sample.{name}", s[name],
             "must be a positive integer")
  _ema_choice(s.ema_rate, "sample.ema_rate")
  _require(s.get("posthoc_ema", 0) == 0 or 0 < s.posthoc_ema < ema.MAX_SIGMA_REL,
           "sample.posthoc_ema", s.get("posthoc_ema"),
           f"0 (off) or a σ_rel in (0, {ema.MAX_SIGMA_REL:.4f}) reconstructed by "
           "--mode=posthoc_ema")


def validate_eval_fields(config) -> None:
  """config.eval (the paths are checked when evaluation starts)."""
  e = config.eval
  steps = int_list(e.steps, "eval.steps")
  int_list(e.colour_steps, "eval.colour_steps")
  _require(bool(name_list(e.samplers)), "eval.samplers", e.samplers,
           "name at least one sampler, e.g. 'ddim'")
  # The names themselves are checked against the registry (evaluation.registry) when
  # evaluate or compare starts, before any work.
  _require(bool(name_list(e.analyses)), "eval.analyses", e.analyses,
           "name at least one analysis, e.g. 'fid_vs_steps'")
  options = samplers.SamplerOptions.from_config(config.sample)
  for scale in float_list(e.guidance_scales, "eval.guidance_scales"):
    _require(scale >= 0, "eval.guidance_scales", e.guidance_scales, "scales must be ≥ 0")
  for sigma_rel in float_list(e.posthoc_ema, "eval.posthoc_ema"):
    _require(0 < sigma_rel < ema.MAX_SIGMA_REL, "eval.posthoc_ema", e.posthoc_ema,
             f"σ_rel values in (0, {ema.MAX_SIGMA_REL:.4f})")
  for sampler in name_list(e.samplers) + [e.colour_sampler]:
    _require(sampler in samplers.SAMPLERS, "eval.samplers/colour_sampler", sampler,
             f"choose from {list(samplers.SAMPLERS)}")
    # Evaluation samples with config.sample's solver settings (evaluation.evaluate).
    options.with_sampler(sampler, steps[0]).check("sample")
  for name in ("num_samples", "num_reference", "colour_num_samples", "x0_num_examples",
               "batch_size", "x0_buckets", "train_curve_steps"):
    _require(isinstance(e[name], int) and e[name] >= 1, f"eval.{name}", e[name],
             "must be a positive integer")
  _require(min(e.num_samples, e.num_reference) > 3, "eval.num_samples/num_reference",
           (e.num_samples, e.num_reference),
           "must exceed 3 (k=3 precision/recall); FID needs hundreds to mean much")
  _ema_choice(e.ema_rate, "eval.ema_rate")
  _require(e.preset in ("",) + tuple(EVAL_PRESETS), "eval.preset", e.preset,
           f"choose '' (the fields as set) or one of {list(EVAL_PRESETS)}")
  _require(isinstance(e.classifier, bool), "eval.classifier", e.classifier,
           "must be True or False")


# Evaluation presets: each replaces these config.eval fields (any others stay as set).
EVAL_PRESETS = {
    # A few minutes on 2 CPU cores for a 32 px model: two FID points of 200 samples.
    "quick": dict(num_samples=200, num_reference=500, samplers="ddim", steps="10,20",
                  colour_steps="2,5,20", colour_num_samples=32, x0_num_examples=128),
}


def with_eval_preset(config, keep=()):
  """A copy of `config` with config.eval.preset's fields applied, except the eval field
  names in `keep` (those given on the command line win), and eval.preset cleared so it
  applies once. Returns `config` itself when it has no preset."""
  if not config.eval.preset:
    return config
  config = config.copy_and_resolve_references()
  config.eval.update({k: v for k, v in EVAL_PRESETS[config.eval.preset].items()
                      if k not in keep})
  config.eval.preset = ""
  return config


def _validate_train_and_optim(config) -> None:
  t, o = config.train, config.optim
  for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "fsdp"):
    _require(isinstance(t[name], int) and t[name] >= 1, f"train.{name}", t[name],
             "must be at least 1" + (" (0 would delete every checkpoint)"
                                     if name == "keep_checkpoints" else ""))
  for name in ("keep_every", "sample_every"):
    _require(isinstance(t[name], int) and t[name] >= 0, f"train.{name}", t[name],
             "must be ≥ 0 (0: off)")
  _require(isinstance(t.resume_step, int) and t.resume_step >= -1, "train.resume_step",
           t.resume_step, "must be -1 (the newest checkpoint that restores) or a saved step")
  _require(t.attention in models.ATTENTION_IMPLS, "train.attention", t.attention,
           f"choose one of {list(models.ATTENTION_IMPLS)}")
  _require(math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr,
           "must be > 0 (warmup_steps ramps it up from 0)")
  for name in ("weight_decay", "grad_clip"):
    _require(math.isfinite(o[name]) and o[name] >= 0, f"optim.{name}", o[name],
             "must be ≥ 0 (0: off)")
  for name in ("b1", "b2"):
    _require(math.isfinite(o[name]) and 0 <= o[name] < 1, f"optim.{name}", o[name],
             "must be in [0, 1)")
  _require(math.isfinite(o.eps) and o.eps > 0, "optim.eps", o.eps, "must be > 0")
  _require(math.isfinite(o.learned_weight_lr) and o.learned_weight_lr > 0,
           "optim.learned_weight_lr", o.learned_weight_lr, "must be > 0")
  _require(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0, "optim.warmup_steps",
           o.warmup_steps, "must be ≥ 0")
  _require(o.lr_schedule in LR_SCHEDULES, "optim.lr_schedule", o.lr_schedule,
           f"choose one of {list(LR_SCHEDULES)}")
  d = config.data
  for name in ("batch_size", "prefetch", "image_size"):
    _require(isinstance(d[name], int) and d[name] >= 1, f"data.{name}", d[name],
             "must be a positive integer")


def weighting_params(config) -> dict:
  """The weighting's parameters from config.diffusion.weighting_params, Nones dropped
  (density_is_weight belongs to the timestep sampler)."""
  return {k: v for k, v in config.diffusion.weighting_params.items()
          if v is not None and k != "density_is_weight"}


def validate_config(config, num_devices: int | None = None) -> None:
  """Raises ConfigError (a ValueError) for the first problem found in `config`: every
  model, diffusion, data, optim, train, sample and eval field is checked, so a bad
  value fails in seconds, before anything compiles or any work could be lost."""
  try:
    _validate(config, num_devices)
  except ConfigError:
    raise
  except ValueError as e:  # the components' own checks (weighting, sampler, model)
    raise ConfigError(str(e)) from None


def _validate(config, num_devices: int | None) -> None:
  unknown = _unknown_fields(config, _default_config())
  if unknown:
    raise ConfigError(f"Unknown config field(s) {unknown}; see "
                      "diffusion_jax/configs/defaults.py for every field.")
  models.validate_model_config(config.model)
  _validate_train_and_optim(config)
  validate_sample_fields(config)
  validate_eval_fields(config)
  d = config.diffusion
  diffusion_lib.check_settings(d.target, d.var_type, d.loss_type)
  build_objective(config, build_diffusion(config))
  if config.model.learn_sigma != (d.var_type == "learned_range"):
    raise ValueError(f"model.learn_sigma={config.model.learn_sigma} conflicts with "
                     f"diffusion.var_type={d.var_type!r}: a learned variance needs "
                     "learn_sigma=True, a fixed one learn_sigma=False.")
  sources.check_dataset_name(config.data.dataset)
  if config.model.image_size != config.data.image_size:
    raise ValueError(f"model.image_size={config.model.image_size} differs from "
                     f"data.image_size={config.data.image_size}; set them equal.")
  if config.train.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"Unknown train.compute_dtype {config.train.compute_dtype!r}; choose "
                     f"one of {list(COMPUTE_DTYPES)}.")
  if config.train.nan_policy not in NAN_POLICIES:
    raise ValueError(f"Unknown train.nan_policy {config.train.nan_policy!r}; choose one of "
                     f"{list(NAN_POLICIES)}.")
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
  _validate_classifier_fields(config)
  stds = config.train.get("posthoc_ema", ())
  if len(set(stds)) != len(stds) or any(not 0 < s < ema.MAX_SIGMA_REL for s in stds):
    raise ValueError(f"train.posthoc_ema={stds}: distinct σ_rel values in "
                     f"(0, {ema.MAX_SIGMA_REL:.4f}), e.g. (0.05, 0.1); () for none.")
  every = config.train.get("posthoc_ema_every", 0)
  if not isinstance(every, int) or every < 0:
    raise ValueError(f"train.posthoc_ema_every={every!r}: steps between snapshots, ≥ 0 "
                     "(0: train.checkpoint_every).")


def build_model(config):
  """The network config.model names, computing in train.compute_dtype."""
  return models.from_config(config.model, config.train.compute_dtype,
                            config.train.get("attention", "einsum"))


def build_diffusion(config) -> diffusion_lib.GaussianDiffusion:
  d = config.diffusion
  return diffusion_lib.create_diffusion(
      d.schedule, d.num_timesteps, target=d.target, var_type=d.var_type,
      loss_type=d.loss_type)


def build_objective(config, diffusion) -> objective_lib.Objective:
  """config.diffusion's weighting and timestep density over `diffusion`."""
  d = config.diffusion
  return objective_lib.build(
      diffusion, d.weighting, weighting_params(config), d.timestep_sampler,
      dict(d.timestep_sampler_params), d.weighting_params.density_is_weight,
      lr=config.optim.learned_weight_lr)


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(config):
  """optim.lr after a linear warmup of optim.warmup_steps: held ("constant"), or
  decayed to 0 at train.num_steps ("cosine"; raising num_steps later stretches it)."""
  o = config.optim
  if o.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, o.lr, o.warmup_steps, max(config.train.num_steps, o.warmup_steps + 1), 0.0)
  if o.warmup_steps > 0:
    return optax.linear_schedule(0.0, o.lr, o.warmup_steps)
  return optax.constant_schedule(o.lr)


class Components(NamedTuple):
  """What a training config builds: the network, the diffusion, the optimiser and the
  objective (weighting, timestep density and any stateful term)."""
  model: Any
  diffusion: diffusion_lib.GaussianDiffusion
  tx: optax.GradientTransformation
  objective: objective_lib.Objective


def build(config) -> Components:
  diffusion = build_diffusion(config)
  return Components(build_model(config), diffusion, build_optimizer(config),
                    build_objective(config, diffusion))


class TrainSettings(NamedTuple):
  """The training step's settings beyond the built components.

  ema_rates: one EMA copy per rate; posthoc_gammas: one power-function EMA per
  exponent, after those (ema.py); grad_accum_steps: micro-batches per step;
  class_cond: whether batches' labels reach the model; seed: the state's base RNG;
  learning_rate: the optimiser's schedule (step -> lr), logged with each step.
  """
  ema_rates: tuple
  posthoc_gammas: tuple
  grad_accum_steps: int
  class_cond: bool
  seed: int
  learning_rate: Any


def train_settings(config) -> TrainSettings:
  return TrainSettings(ema_rates=tuple(float(r) for r in config.optim.ema_rates),
                       posthoc_gammas=tuple(ema.sigma_rel_to_gamma(s)
                                            for s in config.train.get("posthoc_ema", ())),
                       grad_accum_steps=int(config.optim.grad_accum_steps),
                       class_cond=bool(config.model.class_cond), seed=int(config.train.seed),
                       learning_rate=learning_rate_schedule(config))


class LoopSettings(NamedTuple):
  """The training loop's settings: num_steps (the run's end), resume_step (-1: the
  latest checkpoint), log_every / checkpoint_every / sample_every (steps; 0: no grids),
  nan_policy ("halt" or "skip"), batch_size (global images per step), prefetch
  (batches), classifier (score the final samples' recognisability),
  compilation_cache_dir ("" = WORKDIR/compilation_cache, "none" = off), and
  posthoc_ema_every (steps between post-hoc EMA snapshots)."""
  num_steps: int
  resume_step: int
  log_every: int
  checkpoint_every: int
  sample_every: int
  nan_policy: str
  batch_size: int
  prefetch: int
  classifier: bool
  compilation_cache_dir: str
  posthoc_ema_every: int


class Training(NamedTuple):
  """What training builds from a config: the components, the step's settings, the
  loop's, and the config as saved with each checkpoint."""
  components: Components
  settings: TrainSettings
  loop: LoopSettings
  config_json: dict


def training(config) -> Training:
  """`config` validated (ConfigError otherwise) and everything training builds from it:
  the training loop's one entry into this module (a resume adds `saved_differences`)."""
  validate_config(config)
  t = config.train
  loop = LoopSettings(
      num_steps=int(t.num_steps), resume_step=int(t.resume_step), log_every=int(t.log_every),
      checkpoint_every=int(t.checkpoint_every), sample_every=int(t.sample_every),
      nan_policy=t.nan_policy, batch_size=int(config.data.batch_size),
      prefetch=int(config.data.prefetch), classifier=bool(config.eval.classifier),
      compilation_cache_dir=t.compilation_cache_dir,
      posthoc_ema_every=int(t.get("posthoc_ema_every", 0) or t.checkpoint_every))
  return Training(build(config), train_settings(config), loop, as_json_dict(config))


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


def as_json_dict(config) -> dict:
  """`config` (a ConfigDict, or already its JSON dict) as a JSON dict."""
  return config if isinstance(config, dict) else json.loads(to_json(config))


# Fields that change what a checkpoint means or its structure.
CHECKPOINT_FIELDS = {"model": None,
                     "diffusion": ("schedule", "num_timesteps", "target", "var_type"),
                     "optim": ("ema_rates",), "train": ("posthoc_ema",)}
# Of those, the ones that shape only the train state, not the model: a resume must match
# them, sampling and evaluation (which rebuild the state from the saved config) need not.
STATE_ONLY_FIELDS = ("train.posthoc_ema",)


# Fields that define the training objective: changing them on resume is deliberate only.
OBJECTIVE_FIELDS = ("diffusion.weighting", "diffusion.weighting_params", "diffusion.loss_type",
                    "diffusion.timestep_sampler_params",
                    "diffusion.timestep_sampler")


class SavedDifferences(NamedTuple):
  """How a checkpoint's config differs from the current one, as "field: checkpoint …,
  config …" lines. model: CHECKPOINT_FIELDS (the checkpoint is unusable); objective:
  OBJECTIVE_FIELDS (a resume needs train.allow_objective_change)."""
  model: list
  objective: list


def saved_differences(saved: dict, config) -> SavedDifferences:
  """`saved` (a checkpoint's config dict) against `config` (a ConfigDict or its JSON
  dict)."""
  current = as_json_dict(config)
  saved = with_defaults(saved)  # e.g. a model saved before names: a UNet
  model = []
  for section, keys in CHECKPOINT_FIELDS.items():
    old, new = saved.get(section, {}), current[section]
    for key in sorted(keys or set(old) | set(new)):
      a, b = old.get(key), new.get(key)
      if isinstance(a, list) or isinstance(b, list):
        a, b = list(a or []), list(b or [])
      if a != b:
        model.append(f"{section}.{key}: checkpoint {a!r}, config {b!r}")
  objective = []
  for field in OBJECTIVE_FIELDS:
    section, key = field.split(".")
    a, b = saved.get(section, {}).get(key), current[section][key]
    if a != b:
      objective.append(f"{field}: checkpoint {a!r}, config {b!r}")
  return SavedDifferences(model, objective)


def with_defaults(saved: dict) -> dict:
  """A saved config (dict) with every field added since it was saved set to its default
  (the model's from its architecture), so older checkpoints keep loading."""
  base = json.loads(to_json(_default_config()))
  base["model"] = json.loads(json.dumps(models.config_fields(
      models.name_of(saved.get("model", {})))))

  def merge(default, value):
    if isinstance(default, dict) and isinstance(value, dict):
      return {**default, **{k: merge(default.get(k), v) for k, v in value.items()}}
    return value

  return merge(base, saved)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A config saved as JSON (see `with_defaults`)."""
  return ml_collections.ConfigDict(with_defaults(json.loads(text)))
