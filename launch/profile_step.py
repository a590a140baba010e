"""Per-op profile of our compiled train step on this machine: where the step's time goes.

  python3 launch/profile_step.py --config=configs/bench_cpu_small.py [--steps=5] [--top=10]

Compiles the step as `diffusion_jax.tools.bench` does (same config, batch and CPU device
split), traces --steps calls with `jax.profiler`, and sums each HLO instruction's time
over the calls and device threads. Prints the --top instructions as a Markdown table:
ms per step (summed over devices), share of all instruction time, and what each is (the
fusion's root op with its shapes: a convolution's window and dim_labels tell a forward
convolution from its input or weight gradient). The official step's counterpart is
`launch/baseline_bench.py --profile`.

Not every thunk emits a trace event: XLA:CPU's Eigen convolutions (the CPU default of
the CLI entry points, `distributed.CPU_LIBRARY_FLAGS`) do not. The executor time on the
device threads minus the traced instructions is reported as "untraced", so the shares
still add up; to see the convolutions one by one, profile with YNNPACK's convolutions
(`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,`
`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE`).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile


def _computations(hlo: str) -> dict[str, list[str]]:
  """HLO text → {computation name: its instruction lines}."""
  out, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      name = head.group(1)
      out[name] = []
    elif name and line.startswith("  "):
      out[name].append(line.strip())
  return out


def describe(hlo: str) -> dict[str, str]:
  """{instruction name: a short description} for every instruction of the module."""
  comps = _computations(hlo)
  out = {}
  for lines in comps.values():
    for line in lines:
      m = re.match(r"(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
      if not m:
        continue
      name, shape, op = m.groups()
      text = f"{op} {shape}"
      called = re.search(r"calls=%([\w.\-]+)", line)
      if called and called.group(1) in comps:
        root = [l for l in comps[called.group(1)] if l.startswith("ROOT")]
        inner = [l for l in comps[called.group(1)] if re.search(r" (convolution|dot)\(", l)]
        pick = inner[0] if inner else (root[0] if root else "")
        r = re.match(r"(?:ROOT )?%[\w.\-]+ = (\S+) (\w[\w\-]*)\(", pick)
        if r:
          text = f"{op}: {r.group(2)} {r.group(1)}"
          window = re.search(r"window=\{([^}]*)\}", pick)
          labels = re.search(r"dim_labels=(\S+?),?(?:\s|$)", pick)
          if window:
            text += f" window {window.group(1)}"
          if labels:
            text += f" {labels.group(1)}"
      out[name] = text
  return out


def profile(config, steps: int = 5, warmup: int = 3) -> dict:
  """{"ms_per_step": wall ms, "ops": [(name, ms per step summed over devices, share,
  description)], sorted by time}."""
  import time  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import state as state_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training import train
  components, settings = config_lib.build(config), config_lib.train_settings(config)
  mesh = state_lib.make_mesh(config)
  state, shardings = state_lib.create_train_state(components, settings, mesh)
  m, n = config.model, config.data.batch_size
  bs = state_lib.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  batch = {"image": jax.device_put(rng.uniform(-1, 1, (n, m.image_size, m.image_size,
                                                      m.in_channels)).astype(np.float32), bs),
           "label": jax.device_put(np.zeros((n,), np.int32), bs)}
  compiled = train.jit_train_step(components, settings, mesh, shardings).lower(
      state, batch).compile()
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  names = describe(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    wall = (time.perf_counter() - t0) / steps
    trace = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(trace, "rt") as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total = collections.Counter()
  device_threads, executor_ms = set(), 0.0
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      total[e["name"]] += e.get("dur", 0.0) / 1e3 / steps
      device_threads.add((e.get("pid"), e.get("tid")))
  executions = sorted((e.get("pid"), e.get("tid"), e["ts"], e.get("dur", 0.0)) for e in events
                      if e.get("ph") == "X" and e.get("name") == "ThunkExecutor::Execute"
                      and (e.get("pid"), e.get("tid")) in device_threads)
  outer_end = {}
  for pid, tid, ts, dur in executions:  # nested executors (loops, branches) counted once
    if ts >= outer_end.get((pid, tid), float("-inf")):
      executor_ms += dur / 1e3 / steps
      outer_end[(pid, tid)] = ts + dur
  untraced = max(0.0, executor_ms - sum(total.values()))
  if untraced:
    total[UNTRACED] = untraced
    names = dict(names, **{UNTRACED: UNTRACED})
  all_ms = sum(total.values())
  ops = [(name, ms, ms / all_ms, names[name]) for name, ms in total.most_common()]
  return {"ms_per_step": wall * 1e3, "op_ms_per_step": all_ms, "ops": ops,
          "devices": jax.device_count()}


UNTRACED = "untraced thunks (Eigen convolutions, executor overhead)"


def markdown(result: dict, top: int) -> str:
  lines = [f"wall {result['ms_per_step']:.0f} ms per step; instruction time "
           f"{result['op_ms_per_step']:.0f} ms per step summed over {result['devices']} "
           "device(s)", "", "| # | instruction | ms/step | share | what |", "|---|---|---|---|---|"]
  for i, (name, ms, share, what) in enumerate(result["ops"][:top], 1):
    lines.append(f"| {i} | {name} | {ms:.1f} | {share:.1%} | {what} |")
  kinds = collections.Counter()
  for _, ms, _, what in result["ops"]:
    kinds[_kind(what)] += ms
  lines += ["", "| kind | ms/step | share |", "|---|---|---|"]
  for kind, ms in kinds.most_common():
    lines.append(f"| {kind} | {ms:.1f} | {ms / result['op_ms_per_step']:.1%} |")
  return "\n".join(lines)


def _kind(what: str) -> str:
  if what == UNTRACED:
    return what
  if "convolution" in what:
    window = re.search(r"window size=(\d+)x(\d+)", what)
    if window and int(window.group(1)) > 3:
      return "convolution, weight gradient"
    return "convolution, forward or input gradient"
  for key in ("dot", "all-reduce", "reduce", "transpose", "copy", "scatter", "gather"):
    if key in what:
      return key
  return "elementwise / other fusion"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/bench_cpu_small.py")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--top", type=int, default=10)
  p.add_argument("--cpu_devices", type=int, default=-1)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  import importlib.util  # pylint: disable=import-outside-toplevel

  from diffusion_jax import distributed  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("profiled_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  distributed.split_host_cpu(args.cpu_devices if args.cpu_devices != -1 else
                             distributed.cpu_device_count([config.data.batch_size]))
  result = profile(config, args.steps)
  print(markdown(result, args.top))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
