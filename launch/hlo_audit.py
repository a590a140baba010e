"""Audits the train step's HLO for bf16 losses, without a device.

  python3 launch/hlo_audit.py --config=configs/celebahq256.py --batch 8 [--compile]

Lowers the step from shapes (nothing allocated) in float32 and in bfloat16 compute and
counts, in the StableHLO that every backend starts from:
  * converts between float types, and the elements they move (casts cost bandwidth);
  * convolutions and dot products by operand dtype (did every matmul get bf16?);
  * reductions by input dtype (GroupNorm and softmax statistics: f32 is intended);
  * transposes and their elements (layout changes around convolutions and attention);
  * elementwise ops by result dtype (f32 elementwise work in a bf16 step is bandwidth).
With --compile, also the fusions of the XLA:CPU compiled module (a CPU proxy: GPU fusion
differs). Prints a Markdown table, fp32 beside bf16.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TENSOR = re.compile(r"tensor<((?:\d+x)*)(bf16|f16|f32|f64|i\d+|ui\d+|i1)>")
_OP = re.compile(r"=\s*(?:\"?)stablehlo\.(\w+)")
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "exponential",
                "logistic", "rsqrt", "sqrt", "negate", "tanh", "log", "select", "compare"}


def _types(line: str):
  """[(elements, dtype)] of the tensor types on `line`, operands first, result last."""
  return [(math.prod(int(d) for d in dims.split("x") if d), dtype)
          for dims, dtype in _TENSOR.findall(line)]


def audit(text: str) -> collections.Counter:
  """Counts over the StableHLO text of one lowered module (see the module docstring)."""
  c = collections.Counter()
  for line in text.splitlines():
    op = _OP.search(line)
    if not op:
      continue
    name, types = op.group(1), _types(line.split(" : ")[-1]) if " : " in line else []
    if not types:
      continue
    out_n, out_t = types[-1]
    if name == "convert" and len(types) >= 2 and types[0][1] != out_t and (
        types[0][1] in ("bf16", "f32") and out_t in ("bf16", "f32")):
      c[f"convert {types[0][1]}→{out_t}"] += 1
      c[f"convert {types[0][1]}→{out_t} (M elements)"] += out_n / 1e6
    elif name == "convolution":
      c[f"convolution {types[0][1]}×{types[1][1]}→{out_t}"] += 1
      layout = re.search(r"dim_numbers = (\[[^\]]*\]x\[[^\]]*\]->\[[^\]]*\])", line)
      c["convolution layout " + (layout.group(1).replace(", ", "") if layout else "?")] += 1
    elif name == "dot_general":
      c[f"dot_general {types[0][1]}×{types[1][1]}→{out_t}"] += 1
    elif name == "reduce":
      c[f"reduce of {types[0][1]}"] += 1
    elif name == "transpose":
      c["transpose"] += 1
      c["transpose (M elements)"] += out_n / 1e6
    elif name in _ELEMENTWISE and out_t in ("bf16", "f32"):
      c[f"elementwise {out_t} (M elements)"] += out_n / 1e6
  return c


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/celebahq256.py")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--compile", action="store_true",
                      help="also count the XLA:CPU compiled module's fusions")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import importlib.util  # pylint: disable=import-outside-toplevel

  from diffusion_jax.tools import bench  # pylint: disable=import-outside-toplevel
  file, _, arg = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("audited_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  counts = {}
  for dtype in ("float32", "bfloat16"):
    config = module.get_config(arg) if arg else module.get_config()
    config.train.compute_dtype = dtype
    config.data.batch_size = args.batch
    lowered = bench.lower_train_step(config)
    counts[dtype] = audit(lowered.as_text())
    if args.compile:
      hlo = lowered.compile().as_text()
      counts[dtype]["fusions (XLA:CPU compiled)"] = len(re.findall(r"^\s*\S+ = \S+ fusion\(",
                                                                   hlo, re.M))
  keys = sorted(set(counts["float32"]) | set(counts["bfloat16"]))
  fmt = lambda v: f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"
  print(f"Train step of {args.config}, batch {args.batch}, lowered from shapes.\n")
  print("| count | float32 | bfloat16 |\n|---|---|---|")
  for k in keys:
    print(f"| {k} | {fmt(counts['float32'][k])} | {fmt(counts['bfloat16'][k])} |")


if __name__ == "__main__":
  main()
