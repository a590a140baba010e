"""Multi-host start-up through JAX's own runtime (`jax.distributed`)."""
from __future__ import annotations

import os

from absl import logging
import jax
import numpy as np

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize() -> None:
  """Joins the multi-host job when there is one; a single process runs unchanged.

  With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, those are
  used; with DIFFUSION_JAX_DISTRIBUTED=1 (set by launch/), JAX's cluster detection
  (Cloud TPU pod slices, SLURM) supplies them; otherwise the run is single-process.
  """
  if all(os.environ.get(k) for k in _EXPLICIT) or os.environ.get(
      "DIFFUSION_JAX_DISTRIBUTED") == "1":
    # CPU-only jobs (tests, debugging) need a collectives backend across processes;
    # GPU and TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(os.environ.get(k) for k in _EXPLICIT):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("DIFFUSION_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


_HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU's YNNPACK library for dots and reductions, and its Eigen convolutions rather than
# YNNPACK's: a train step +6% at 32 px and +8% at 64 px side by side on 2 cores
# (PERF_NOTES.md). Measured with jaxlib 0.10.x only; other versions keep XLA's default.
_YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_LIBRARY_FLAGS = (f"{_YNN_FUSION_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                     "LIBRARY_FUSION_TYPE_REDUCE")
_CPU_LIBRARY_FLAGS_JAXLIB = "0.10."


# Fewer images than this per XLA device cost more in per-device work (the optimizer runs
# on every device) than splitting the batch gains: on 2 cores, batch 4 trained 16–22%
# faster on one device than on two, batch 16 the same (PERF_NOTES.md).
MIN_IMAGES_PER_DEVICE = 8


def cpu_device_count(batch_sizes, cores: int | None = None,
                     min_per_device: int = MIN_IMAGES_PER_DEVICE) -> int:
  """The largest count ≤ the usable cores that divides every batch size into shares of
  at least `min_per_device` images (at least 1)."""
  cores = cores or len(os.sched_getaffinity(0))
  return max((d for d in range(1, cores + 1)
              if all(b % d == 0 and b // d >= min_per_device for b in batch_sizes)), default=1)


def split_host_cpu(count: int) -> int:
  """Presents the host CPU as `count` XLA devices, so the data-parallel step runs one
  batch shard per core, and picks XLA:CPU's convolution library (`CPU_LIBRARY_FLAGS`).
  On 2 cores at batch 16 two devices were 1.25× one with YNNPACK's convolutions and
  are level with Eigen's; see `cpu_device_count` and PERF_NOTES.md.

  Only the CPU backend is affected: GPU and TPU runs still use their accelerators. Must
  run before JAX initialises its backends (the CLI entry points call it first); an
  explicit --xla_force_host_platform_device_count or --xla_cpu_experimental_ynn_fusion_type
  in XLA_FLAGS wins. Returns the device count in effect, or 0 when XLA_FLAGS already
  decides it.
  """
  if count < 1 and _HOST_DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    raise ValueError(f"--cpu_devices={count}: must be ≥ 1 (or -1 for automatic).")
  add_cpu_library_flags()
  flags = os.environ.get("XLA_FLAGS", "")
  if _HOST_DEVICE_FLAG in flags:
    return 0
  os.environ["XLA_FLAGS"] = f"{flags} {_HOST_DEVICE_FLAG}={count}".strip()
  return count


def add_cpu_library_flags() -> None:
  """Adds `CPU_LIBRARY_FLAGS` to XLA_FLAGS (jaxlib 0.10.x; an explicit setting wins).

  Different convolution kernels round differently, so a process that compares its own
  training with a CLI run's bitwise (the tests) calls this before JAX starts too.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_FUSION_FLAG not in flags and _jaxlib_version().startswith(_CPU_LIBRARY_FLAGS_JAXLIB):
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_LIBRARY_FLAGS}".strip()


def _jaxlib_version() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return ""


def host_to_global(x, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array of `sharding` from a host value that every process holds whole (the
  same params, the same batch): each process places only its own devices' slices, so no
  value crosses between hosts. In one process this is a device_put."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def barrier(name: str) -> None:
  """Waits until every process of a multi-host job reaches `name` (no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
