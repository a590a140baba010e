"""Benchmark: compile time, train-step and sampler-step throughput, memory, MFU.

  python -m diffusion_jax.tools.bench --config=configs/bench_cpu_small.py --json=bench.json

Times the compiled train step (forward, backward, AdamW, EMA) on a synthetic batch of
config.data.batch_size, and one DDIM sampler step on the same batch, each as the
median of --runs calls after --warmup calls. state_bytes_per_device is the train state
one device holds (it shrinks with train.fsdp); peak_device_memory_gb is the backend's
own peak where it reports one (GPUs, TPUs), which includes compile-time autotuning;
step_memory_gb is what the compiled step holds (XLA's memory analysis: arguments, outputs
and temporaries), the steady state. FLOPs come from XLA's cost analysis of the step
before partitioning (the same count on every backend; --flops_only prints just that,
lowered from shapes without allocating);
MFU is reported where the device's peak is known (GPUs and TPUs).

  python -m diffusion_jax.tools.bench --config=configs/bench_cpu_small.py --baseline

runs this benchmark and the paper's official PyTorch step (../shared/baseline/
run_ref_step.sh, case --baseline_case) alternately, --baseline_runs separate processes of
each, and prints both medians and the ratio: the only kind of ratio docs/benchmarks.md reports.
Pass flags as --name=value.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from diffusion_jax import config_lib
from diffusion_jax import distributed
from diffusion_jax import models
from diffusion_jax import state as state_lib
from diffusion_jax.models import winograd
from diffusion_jax.tools import allocator
from diffusion_jax.training import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config to benchmark.", lock_config=True)
flags.DEFINE_string("json", None, "Write the results here as JSON.")
flags.DEFINE_integer("runs", 10, "Timed calls per measurement (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls before timing.")
flags.DEFINE_bool("flops_only", False, "Only print the train step's TFLOP count (lowered "
                  "from shapes: nothing is allocated or compiled).")
flags.DEFINE_integer("cpu_devices", -1, "CPU only: XLA devices the host is split into "
                     "(-1: one per core, dividing the batch into shares of at least 8; "
                     "1: a single device).")
flags.DEFINE_bool("baseline", False, "Also time the official PyTorch step on the same case, "
                  "alternating separate processes, and report both medians and the ratio.")
flags.DEFINE_string("baseline_case", "", "The official runner's case: small32 "
                    "(= configs/bench_cpu_small.py), paper64 (= configs/bench_cpu_small.py:"
                    "paper64) or paper256; empty: the case whose model and batch equal the "
                    "config's.")
flags.DEFINE_enum("baseline_allocator", "system", ["system", "tcmalloc"],
                  "The official step's host allocator: system (what its users get) or "
                  "tcmalloc (as ours: compares the steps, not the allocators).")
flags.DEFINE_integer("baseline_runs", 3, "Processes of each side, alternating.")
flags.DEFINE_string("baseline_cmd", os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "baseline",
    "run_ref_step.sh")), "The official step's runner beside the checkout (prints one JSON "
                    "line with images_per_s).")

# Dense peak TFLOP/s per chip by compute dtype (vendor figures, no sparsity). On NVIDIA
# GPUs XLA's default precision runs float32 convolutions and matmuls as TF32 on the tensor
# cores, so float32 is measured against the TF32 peak.
PEAK_TFLOPS = {
    "H100": {"float32": 494.7, "bfloat16": 989.4},
    "H200": {"float32": 494.7, "bfloat16": 989.4},
    "A100": {"float32": 156.0, "bfloat16": 312.0},
    "TPU v4": {"float32": 275.0, "bfloat16": 275.0},
    "TPU v5": {"float32": 197.0, "bfloat16": 197.0},
}


def _median_seconds(fn, runs: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _peak(dtype: str):
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return peaks[dtype]
  return None


def _tflop(lowered) -> float:
  """TFLOP of a lowered step, from XLA's cost analysis of the HLO before partitioning and
  backend passes: the compiled module's misses convolutions that GPUs run as cuDNN custom
  calls (it reported 0.08 TFLOP for the 9.2 TFLOP celebahq256 step at batch 8 on an H100)."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) / 1e12 if cost else 0.0


def _abstract_batch(config, mesh) -> dict:
  m, bsz = config.model, config.data.batch_size
  sharding = state_lib.batch_sharding(mesh)
  return {"image": jax.ShapeDtypeStruct((bsz, m.image_size, m.image_size, m.in_channels),
                                        jnp.float32, sharding=sharding),
          "label": jax.ShapeDtypeStruct((bsz,), jnp.int32, sharding=sharding)}


def lower_train_step(config):
  """`config`'s train step (global batch) lowered from shapes alone: nothing allocated.
  Its convolutions are XLA's on every backend (`winograd.direct_convolutions`): the step
  as an accelerator runs it, and the FLOPs of the model as defined."""
  config_lib.validate_config(config)
  components, settings = config_lib.build(config), config_lib.train_settings(config)
  mesh = state_lib.make_mesh(config)
  abstract = state_lib.abstract_state(components, settings)
  shardings = state_lib.state_sharding(mesh, abstract)
  step = train.jit_train_step(components, settings, mesh, shardings)
  with winograd.direct_convolutions():
    return step.lower(abstract, _abstract_batch(config, mesh))


def train_step_tflop(config) -> float:
  """TFLOP of one train step of `config` (global batch)."""
  return _tflop(lower_train_step(config))


def benchmark(config, runs: int = 10, warmup: int = 2) -> dict:
  """The benchmark's numbers for `config` (see the module docstring)."""
  config_lib.validate_config(config)
  components, settings = config_lib.build(config), config_lib.train_settings(config)
  model, diffusion = components.model, components.diffusion
  mesh = state_lib.make_mesh(config)
  state, shardings = state_lib.create_train_state(components, settings, mesh)
  state_bytes = state_lib.state_bytes_per_device(state, shardings)
  m, bsz = config.model, config.data.batch_size
  rng = np.random.default_rng(0)
  batch_sharding = state_lib.batch_sharding(mesh)
  batch = {"image": jax.device_put(rng.uniform(-1, 1, (bsz, m.image_size, m.image_size,
                                                       m.in_channels)).astype(np.float32),
                                   batch_sharding),
           "label": jax.device_put(np.zeros((bsz,), np.int32), batch_sharding)}
  step = train.jit_train_step(components, settings, mesh, shardings)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def train_call():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  train_s = _median_seconds(train_call, runs, warmup)

  spaced = diffusion.respace(f"ddim{min(50, diffusion.num_timesteps)}")
  labels = batch["label"] if m.class_cond else None

  @jax.jit
  def sample_step(params, x):
    from diffusion_jax.sampling import samplers  # pylint: disable=import-outside-toplevel
    fn = models.bind(model, params, labels)
    t = jnp.full((x.shape[0],), spaced.num_timesteps // 2, jnp.int32)
    return samplers.ddim_sample(spaced, fn, x, t, jax.random.PRNGKey(0))["sample"]

  x = batch["image"]
  params = holder["state"].ema_params[0]
  sample_s = _median_seconds(lambda: sample_step(params, x), runs, warmup)

  # The model's FLOPs with direct convolutions, so that TFLOP/s and MFU compare across
  # backends (XLA:CPU's step does fewer multiplications with Winograd's convolutions).
  device = jax.devices()[0]
  tflop = _tflop(lowered) if device.platform != "cpu" else train_step_tflop(config)
  memory = compiled.memory_analysis()
  stats = device.memory_stats() or {}
  result = {
      "device": f"{jax.device_count()}× {device.device_kind}",
      "host_allocator": allocator.in_use(),
      "batch_size": bsz,
      "compute_dtype": config.train.compute_dtype,
      "fsdp": config.train.fsdp,
      "state_bytes_per_device": state_bytes,
      "compile_s": compile_s,
      "train_step_s": train_s,
      "train_images_per_s": bsz / train_s,
      "sample_step_s": sample_s,
      "sample_image_steps_per_s": bsz / sample_s,
      "peak_host_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      "peak_device_memory_gb": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
      # What the compiled step itself holds per device (its arguments, outputs and
      # temporaries, donated buffers counted once), free of compile-time autotuning.
      "step_memory_gb": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                         - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / 2**30
                        if memory is not None else None,
      "train_step_tflop": tflop,
      "train_tflops_per_s": tflop / train_s,
  }
  peak = _peak(config.train.compute_dtype)
  if peak and device.platform != "cpu":
    result["mfu"] = result["train_tflops_per_s"] / (peak * jax.device_count())
  return result


def side_by_side(ours_cmd: list[str], baseline_cmd: list[str], runs: int,
                 baseline_allocator: str = "system") -> dict:
  """Alternates `runs` processes of each command (ours first) and returns both sides'
  train images/s per run, their medians and the ratio ours ÷ official.

  ours_cmd must accept `--json=FILE` (diffusion_jax.tools.bench); baseline_cmd prints a JSON
  line with "images_per_s" last (../shared/baseline/run_ref_step.sh). The baseline runs
  with `baseline_allocator` (`allocator.environment_for_other_programs`): "system", the
  environment its own users have, or "tcmalloc", the allocator our entry points preload.
  """
  baseline_env = allocator.environment_for_other_programs(os.environ, baseline_allocator)
  ours, theirs = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(runs):
      out = os.path.join(tmp, f"ours_{i}.json")
      done = subprocess.run(ours_cmd + [f"--json={out}"], capture_output=True, text=True)
      if done.returncode:
        raise RuntimeError(f"{' '.join(ours_cmd)} failed:\n{done.stderr[-2000:]}")
      with open(out, encoding="utf-8") as f:
        ours.append(json.load(f)["train_images_per_s"])
      done = subprocess.run(baseline_cmd, capture_output=True, text=True, env=baseline_env)
      if done.returncode:
        raise RuntimeError(f"{' '.join(baseline_cmd)} failed:\n{done.stderr[-2000:]}")
      theirs.append(json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"])
  a, b = statistics.median(ours), statistics.median(theirs)
  return {"ours_images_per_s": ours, "official_images_per_s": theirs,
          "ours_median": a, "official_median": b, "ratio": a / b, "runs": runs,
          "baseline_allocator": baseline_allocator}


# The official runner's cases (../shared/baseline/ref_step.py) as (image_size,
# num_channels, batch_size); the rest of each case is the paper's model.
BASELINE_CASES = {"small32": (32, 64, 16), "paper64": (64, 128, 4), "paper256": (256, 128, 8)}


def baseline_case_for(config, case: str = "") -> str:
  """The official runner's case for `config` (checked against it when `case` is given)."""
  ours = (config.model.image_size, config.model.num_channels, config.data.batch_size)
  if not case:
    matches = [name for name, key in BASELINE_CASES.items() if key == ours]
    if not matches:
      raise app.UsageError(
          f"No official case has image_size, num_channels, batch_size = {ours}; the cases "
          f"are {BASELINE_CASES}. Use configs/bench_cpu_small.py (small32) or "
          "configs/bench_cpu_small.py:paper64, or pass --baseline_case.")
    return matches[0]
  if case not in BASELINE_CASES:
    raise app.UsageError(f"--baseline_case={case!r}: choose one of {list(BASELINE_CASES)}.")
  if BASELINE_CASES[case] != ours:
    raise app.UsageError(
        f"--baseline_case={case} is image_size, num_channels, batch_size = "
        f"{BASELINE_CASES[case]} but the config has {ours}: the two sides would time "
        "different steps. Pick the matching config or case.")
  return case


def _side_by_side_main(argv) -> None:
  if not os.path.exists(FLAGS.baseline_cmd):
    raise app.UsageError(f"--baseline_cmd={FLAGS.baseline_cmd} does not exist; point it at "
                         "the official code's runner (../shared/baseline/run_ref_step.sh).")
  dropped = ("--baseline", "--json")  # --baseline_* too: ours never sees them
  own = [a for a in argv[1:] if not a.startswith(dropped) and a != "--nobaseline"]
  ours_cmd = [sys.executable, "-m", "diffusion_jax.tools.bench"] + own
  case = baseline_case_for(FLAGS.config, FLAGS.baseline_case)
  try:
    result = side_by_side(ours_cmd, [FLAGS.baseline_cmd, case], FLAGS.baseline_runs,
                          FLAGS.baseline_allocator)
  except ValueError as e:
    raise app.UsageError(f"--baseline_allocator={FLAGS.baseline_allocator}: {e}") from e
  result["case"] = case
  print(f"side by side, alternating {result['runs']} processes each, on this machine:\n"
        f"  diffusion_jax  {result['ours_median']:.2f} train images/s  "
        f"(runs {', '.join(f'{v:.2f}' for v in result['ours_images_per_s'])})\n"
        f"  official       {result['official_median']:.2f} train images/s, "
        f"{result['baseline_allocator']} allocator  "
        f"(runs {', '.join(f'{v:.2f}' for v in result['official_images_per_s'])})\n"
        f"  ratio          {result['ratio']:.2f}×  (diffusion_jax ÷ official, medians)")
  if FLAGS.json:
    from diffusion_jax import paths  # pylint: disable=import-outside-toplevel
    paths.write_text(FLAGS.json, json.dumps(result, indent=1))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.baseline:
    _side_by_side_main(sys.argv)
    return
  distributed.split_host_cpu(FLAGS.cpu_devices if FLAGS.cpu_devices != -1 else
                             distributed.cpu_device_count([FLAGS.config.data.batch_size]))
  if FLAGS.flops_only:
    print(f"train_step_tflop  {train_step_tflop(FLAGS.config):.4g}")
    return
  result = benchmark(FLAGS.config, FLAGS.runs, FLAGS.warmup)
  width = max(len(k) for k in result)
  for k, v in result.items():
    print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
  if FLAGS.json:
    from diffusion_jax import paths  # pylint: disable=import-outside-toplevel
    paths.write_text(FLAGS.json, json.dumps(result, indent=1))


if __name__ == "__main__":
  allocator.use_tcmalloc()
  flags.mark_flags_as_required(["config"])
  app.run(main)
