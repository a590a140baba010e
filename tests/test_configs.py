"""Every config in configs/ validates; the paper's 256px model has its 93.6M parameters."""
import glob
import importlib
import math
import os
import time

import jax
import pytest

from diffusion_jax import config_lib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def test_all_configs_are_listed():
  assert {"default", "quickstart", "celebahq256", "ffhq256", "afhq_dog256", "metfaces256",
          "cifar10", "imagenet256", "bench_cpu_small"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates(name):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config()
  config_lib.validate_config(config, num_devices=1)
  assert module.__doc__ and "python -m diffusion_jax" in module.__doc__


@pytest.mark.parametrize("weighting", ["constant", "debias", "p2", "min_snr", "snr"])
def test_paper_config_takes_the_weighting_as_argument(weighting):
  from configs import celebahq256  # pylint: disable=import-outside-toplevel
  config = celebahq256.get_config(weighting)
  assert config.diffusion.weighting == weighting
  config_lib.validate_config(config, num_devices=1)


def test_paper_256_model_size():
  from configs import celebahq256  # pylint: disable=import-outside-toplevel
  model = config_lib.build_model(celebahq256.get_config())
  shapes = jax.eval_shape(lambda k: train.models.init_params(model, k), jax.random.PRNGKey(0))
  assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == 93_563_910


def _parts(config):
  return config_lib.build(config), config_lib.train_settings(config)


@pytest.mark.slow
def test_paper_256_train_step_compiles_at_batch_1():
  from configs import celebahq256  # pylint: disable=import-outside-toplevel
  config = celebahq256.get_config()
  config.data.batch_size = 1
  mesh = train.make_mesh(config, jax.devices()[:1])
  state = jax.eval_shape(lambda: train.create_train_state(*_parts(config), mesh)[0])
  batch = {"image": jax.ShapeDtypeStruct((1, 256, 256, 3), jax.numpy.float32),
           "label": jax.ShapeDtypeStruct((1,), jax.numpy.int32)}
  t0 = time.time()
  jax.jit(train.make_train_step(*_parts(config)),
          donate_argnums=0).lower(state, batch).compile()
  print(f"celebahq256 train step compile: {time.time() - t0:.1f} s")


# Fields with no invalid value of their type, and why. Every other train/optim/data/
# sample/eval field must reject at least one bad value in `validate_config`.
_FREE_FIELDS = {
    "train.seed": "any integer is a seed",
    "sample.seed": "any integer is a seed",
    "eval.seed": "any integer is a seed",
    "data.seed": "any integer is a seed",
    "data.data_dir": "a path, read when the data loads",
    "data.image_dir": "a path, read by --mode=prepare",
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


@pytest.mark.parametrize("section", ["train", "optim", "data", "sample", "eval"])
def test_every_field_is_validated_before_anything_compiles(section):
  from configs import default  # pylint: disable=import-outside-toplevel
  from tests import tiny_config  # pylint: disable=import-outside-toplevel
  unchecked = []
  for field, value in _leaves(default.get_config()[section], f"{section}."):
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


@pytest.mark.parametrize("override, field", [
    ("--config.train.keep_checkpoints=0", "keep_checkpoints"),
    ("--config.optim.lr=0", "optim.lr"),
    ("--config.sample.sampler=euler", "sample.sampler")])
def test_work_losing_configs_fail_at_once_with_exit_code_2(override, field, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  run = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path / 'wd'}", override], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), timeout=120)
  assert run.returncode == 2, run.stderr[-2000:]
  assert field in run.stderr and "Traceback" not in run.stderr
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("override, message", [
    ("--config.train.foo=3", "Unknown config field config.train.foo: config.train has"),
    ("--config.diffusion.weightin=p2", "did you mean config.diffusion.weighting?"),
    ("--config.train.num_steps=abc", "flag --config.train.num_steps=abc: invalid literal"),
    ("--config.diffusion.weighting=foo", "Unknown loss weighting 'foo'; choose one of"),
    ("--config.eval.preset=fast", "config.eval.preset='fast'"),
    ("--mode=sample", "No checkpoints in"),
    ("--mode=evaluate", "No checkpoints in"),
])
def test_bad_flags_are_one_line_with_exit_code_2(override, message, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  run = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path / 'wd'}", override], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), timeout=120)
  assert run.returncode == 2
  first = run.stderr.splitlines()[0]
  assert first.startswith("error: ") and message in first and "Traceback" not in run.stderr
  assert not (tmp_path / "wd").exists()


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
  from tests import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config.get_config()
  config.optim.update(lr=1e-3, warmup_steps=10, lr_schedule="cosine")
  config.train.num_steps = 110
  schedule = config_lib.learning_rate_schedule(config)
  assert float(schedule(0)) == 0.0 and math.isclose(float(schedule(10)), 1e-3, rel_tol=1e-6)
  assert math.isclose(float(schedule(60)), 0.5e-3, rel_tol=1e-4)
  assert float(schedule(110)) == 0.0
  config.optim.lr_schedule = "constant"
  assert math.isclose(float(config_lib.learning_rate_schedule(config)(110)), 1e-3, rel_tol=1e-6)
