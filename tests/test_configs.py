"""Every config in configs/ validates; the paper's 256px model has its 93.6M parameters."""
import glob
import importlib
import math
import os
import time

import jax
import pytest

from diffusion_jax import config_lib
from diffusion_jax import state as state_lib
from diffusion_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def test_all_configs_are_listed():
  assert {"quickstart", "api_tour", "dit_quickstart", "celebahq256", "ffhq256", "afhq_dog256", "metfaces256",
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
  mesh = state_lib.make_mesh(config, jax.devices()[:1])
  state = jax.eval_shape(lambda: state_lib.create_train_state(*_parts(config), mesh)[0])
  batch = {"image": jax.ShapeDtypeStruct((1, 256, 256, 3), jax.numpy.float32),
           "label": jax.ShapeDtypeStruct((1,), jax.numpy.int32)}
  t0 = time.time()
  jax.jit(train.make_train_step(*_parts(config)),
          donate_argnums=0).lower(state, batch).compile()
  print(f"celebahq256 train step compile: {time.time() - t0:.1f} s")
