"""The dataset registry: data.dataset names a registered source."""
import numpy as np
import pytest

from diffusion_jax import config_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.data import sources
from tests import tiny_config


def test_a_source_registered_from_a_test_file_trains(monkeypatch):
  monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))

  @sources.register("stripes", takes_argument=True)
  def _stripes(data, argument):
    images = np.zeros((6, data.image_size, data.image_size, 1), np.uint8)
    images[:, ::int(argument)] = 255
    return sources.ArraySource(images, np.arange(6))

  config = tiny_config.get_config()
  config.data.dataset = "stripes:4"
  config_lib.validate_config(config)
  assert "stripes:NAME" in sources.names()
  batch = next(input_pipeline.create_iterator(config.data, seed=0))
  assert batch["image"].shape == (config.data.batch_size, 32, 32, 1)
  rows = batch["image"][0, :, 0, 0]
  assert (rows[::4] == 1.0).all() and (rows[1::4] == -1.0).all()


@pytest.mark.parametrize("name", ["mnist", "tfds", "tfds:", "digits:8", ""])
def test_names_outside_the_registry_are_refused(name):
  with pytest.raises(sources.DataError, match=r"Unknown data.dataset .*choose one of .*'tfds:NAME'"):
    sources.check_dataset_name(name)
