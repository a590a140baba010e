"""config_lib: every field validated before anything compiles; presets; schedules; the
model registry's per-architecture fields."""
import math

import pytest

from diffusion_jax import config_lib
from diffusion_jax import models
from tests import tiny_config

# Fields with no invalid value of their type, and why. Every other train/optim/data/
# sample/eval/classifier field must reject at least one bad value in `validate_config`.
_FREE_FIELDS = {
    "train.seed": "any integer is a seed",
    "sample.seed": "any integer is a seed",
    "eval.seed": "any integer is a seed",
    "data.seed": "any integer is a seed",
    "classifier.seed": "any integer is a seed",
    "data.data_dir": "a path, read when the data loads",
    "data.image_dir": "a path, read by --mode=prepare",
    "data.holdout": "a fraction or a folder, checked by --mode=prepare",
    "data.split": "dataset-dependent, checked when the data loads",
    "train.compilation_cache_dir": "a path, or 'none'",
    "eval.reference_npz": "a path, checked when evaluation starts",
    "eval.inception_path": "a path, checked when evaluation starts",
    "eval.x0_split": "dataset-dependent, checked when the data loads",
}


def _leaves(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _bad_values(value):
  if isinstance(value, bool):
    return []  # every bool is valid
  if isinstance(value, int):
    return [-1, 0, -2]
  if isinstance(value, float):
    return [float("nan"), -2.0]
  if isinstance(value, str):
    return ["no-such-choice", ""]
  if isinstance(value, tuple):
    return [(), (2.0,)]
  return []


@pytest.mark.parametrize("section", ["train", "optim", "data", "sample", "eval", "classifier"])
def test_every_field_is_validated_before_anything_compiles(section):
  from diffusion_jax.configs import defaults  # pylint: disable=import-outside-toplevel
  unchecked = []
  for field, value in _leaves(defaults.get_config()[section], f"{section}."):
    if field in _FREE_FIELDS or isinstance(value, bool):
      continue
    rejected = False
    for bad in _bad_values(value):
      config = tiny_config.get_config()
      sub, name = config, field.split(".")
      for part in name[:-1]:
        sub = sub[part]
      with sub.ignore_type():
        sub[name[-1]] = bad
      try:
        config_lib.validate_config(config, num_devices=1)
      except ValueError as e:
        rejected = True
        assert field.split(".")[-1] in str(e) or "dataset" in str(e), (field, str(e))
        break
    if not rejected:
      unchecked.append(field)
  assert not unchecked, f"accepted with a bad value: {unchecked}"


def test_eval_preset_applies_once_and_explicit_fields_win():
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  config = quickstart.get_config()
  config.eval.preset = "quick"
  quick = config_lib.with_eval_preset(config, keep={"num_samples"})
  assert quick.eval.preset == "" and config.eval.preset == "quick"  # a copy
  assert quick.eval.num_samples == config.eval.num_samples == 300  # kept
  assert quick.eval.steps == "10,20" and quick.eval.num_reference == 500
  assert config_lib.with_eval_preset(quick) is quick  # applied once
  config.eval.preset = "fast"
  with pytest.raises(config_lib.ConfigError, match="eval.preset"):
    config_lib.validate_config(config, num_devices=1)


def test_cosine_schedule_warms_up_then_decays_to_zero_at_the_last_step():
  config = tiny_config.get_config()
  config.optim.update(lr=1e-3, warmup_steps=10, lr_schedule="cosine")
  config.train.num_steps = 110
  schedule = config_lib.learning_rate_schedule(config)
  assert float(schedule(0)) == 0.0 and math.isclose(float(schedule(10)), 1e-3, rel_tol=1e-6)
  assert math.isclose(float(schedule(60)), 0.5e-3, rel_tol=1e-4)
  assert float(schedule(110)) == 0.0
  config.optim.lr_schedule = "constant"
  assert math.isclose(float(config_lib.learning_rate_schedule(config)(110)), 1e-3, rel_tol=1e-6)


@pytest.mark.parametrize("name,field,message", [
    ("adm_unet", "depth", "Unknown model field(s) ['depth'] for model.name='adm_unet'"),
    ("dit", "num_channels", "Unknown model field(s) ['num_channels'] for model.name='dit'"),
])
def test_model_fields_are_checked_per_architecture(name, field, message):
  config = tiny_config.get_config()
  config.model = models.config_fields(name)
  config.model.update(image_size=32, in_channels=1)
  config_lib.validate_config(config, num_devices=1)
  with config.model.unlocked():
    config.model[field] = 3
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")
                     .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
    config_lib.validate_config(config, num_devices=1)


def test_unknown_architecture_and_bad_dit_settings_are_config_errors():
  config = tiny_config.get_config()
  config.model.name = "vit"
  with pytest.raises(config_lib.ConfigError, match="Unknown model.name 'vit'; choose one of"):
    config_lib.validate_config(config, num_devices=1)
  config = tiny_config.get_config()
  config.model = models.config_fields("dit")
  config.model.update(image_size=32, in_channels=1, patch_size=5)
  with pytest.raises(config_lib.ConfigError, match="not divisible by patch_size=5"):
    config_lib.validate_config(config, num_devices=1)


def test_every_architecture_builds_from_its_own_defaults():
  for name in models.ARCHITECTURES:
    fields = models.config_fields(name)
    assert fields["name"] == name and set(models.COMMON_FIELDS) <= set(fields)
    models.validate_model_config(fields)
    assert models.architecture_of(models.from_config(fields)) is models.architecture(name)


def test_a_checkpoint_config_saved_before_model_names_is_a_unet():
  config = tiny_config.get_config()
  saved = config.to_dict()
  del saved["model"]["name"]
  assert config_lib.saved_differences(saved, config).model == []
  config.model = models.config_fields("dit")
  config.model.update(image_size=32, in_channels=1)
  assert ("model.name: checkpoint 'adm_unet', config 'dit'"
          in config_lib.saved_differences(saved, config).model)


def test_timestep_samplers_are_built_and_checked_from_the_config():
  config = tiny_config.get_config()
  for name in ("importance", "logit_normal", "laplace_logsnr"):
    config.diffusion.timestep_sampler = name
    config_lib.validate_config(config, num_devices=1)
    sampler = config_lib.build(config).objective.tdensity
    assert sampler.name == name and len(sampler.density) == 1000
  config.diffusion.timestep_sampler_params.b = -1.0
  with pytest.raises(config_lib.ConfigError, match="timestep_sampler_params.b=-1.0"):
    config_lib.validate_config(config, num_devices=1)
  config.diffusion.timestep_sampler = "uniform"
  config.diffusion.weighting_params.density_is_weight = True
  with pytest.raises(config_lib.ConfigError, match="density_is_weight applies to"):
    config_lib.validate_config(config, num_devices=1)


def test_a_config_saved_before_new_fields_loads_with_their_defaults():
  import json  # pylint: disable=import-outside-toplevel
  saved = tiny_config.get_config().to_dict()
  del saved["diffusion"]["timestep_sampler_params"]
  del saved["diffusion"]["weighting_params"]["density_is_weight"]
  del saved["sample"]["order"]
  loaded = config_lib.from_json(json.dumps(saved))
  assert loaded.diffusion.timestep_sampler_params.b == 0.5
  assert loaded.sample.order == 2 and loaded.model.num_channels == 32
  config_lib.validate_config(loaded, num_devices=1)
  assert config_lib.saved_differences(saved, tiny_config.get_config()).objective == []


@pytest.mark.parametrize("weighting, params, sampler, sampler_params, message", [
    ("min_snr", {"gamma": -5.0}, "uniform", {}, "negative at steps"),  # trained with loss −6228
    ("min_snr", {"gamma": 0.0}, "uniform", {}, "zero at every step"),
    ("p2", {"k": math.inf}, "uniform", {}, "zero at every step"),
    ("debias", {"max_weight": -1.0}, "uniform", {}, "max_weight=-1.0: must be > 0"),
    ("debias", {}, "logit_normal", {"loc": 1e6}, "no usable density"),
    ("debias", {}, "logit_normal", {"loc": math.nan}, "loc=nan: must be finite"),
    ("debias", {}, "logit_normal", {"scale": 1e-9}, "no usable density"),
    ("debias", {}, "laplace_logsnr", {"b": math.inf}, "b=inf: must be finite"),
])
def test_objective_values_that_would_train_garbage_are_config_errors(
    weighting, params, sampler, sampler_params, message):
  """Weight tables must be finite, ≥ 0 and not all zero, densities finite and normalisable:
  checked in validation, before anything compiles, naming the field."""
  config = tiny_config.get_config()
  config.diffusion.weighting = weighting
  config.diffusion.weighting_params.update(params)
  config.diffusion.timestep_sampler = sampler
  config.diffusion.timestep_sampler_params.update(sampler_params)
  with pytest.raises(config_lib.ConfigError, match=message) as err:
    config_lib.validate_config(config, num_devices=1)
  assert "weighting" in str(err.value) or "timestep_sampler" in str(err.value)
