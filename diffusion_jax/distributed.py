"""Multi-host start-up through JAX's own runtime (`jax.distributed`)."""
from __future__ import annotations

import os

import jax
from absl import logging

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize() -> None:
  """Joins the multi-host job when there is one; a single process runs unchanged.

  With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, those are
  used; with DIFFUSION_JAX_DISTRIBUTED=1 (set by launch/), JAX's cluster detection
  (Cloud TPU pod slices, SLURM) supplies them; otherwise the run is single-process.
  """
  if all(os.environ.get(k) for k in _EXPLICIT):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("DIFFUSION_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
