"""Shared test set-up: CPU only, and small helpers."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from diffusion_jax import distributed  # noqa: E402

# The CLI's CPU kernels, so in-process runs and CLI subprocesses agree bitwise.
distributed.add_cpu_library_flags()

import jax  # noqa: E402

# Tests run tiny models: XLA's optimisation passes cost more compile time than they save.
jax.config.update("jax_disable_most_optimizations", True)


import itertools  # noqa: E402

import pytest  # noqa: E402

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A local GCS emulator, with this process's clients pointed at it."""
  from diffusion_jax import paths  # pylint: disable=import-outside-toplevel
  from tests.gcs_emulator import GcsEmulator  # pylint: disable=import-outside-toplevel
  emulator = GcsEmulator(tmp_path_factory.mktemp("gcs") / "root").start()
  saved = {k: os.environ.get(k) for k in (*emulator.env, "CLOUD_STORAGE_EMULATOR_ENDPOINT")}
  os.environ.update(emulator.env)
  os.environ.pop("CLOUD_STORAGE_EMULATOR_ENDPOINT", None)
  paths.configure_gcs_clients()
  yield emulator
  emulator.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture
def bucket(gcs):
  """A new, empty bucket: its gs:// URL."""
  return gcs.create_bucket(f"test-bucket-{next(_bucket_ids)}")
