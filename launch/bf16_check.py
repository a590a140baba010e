"""bf16 against fp32: the quickstart trained twice from one seed, once per compute dtype.

  python3 launch/bf16_check.py --steps=600 --json=bf16.json

Trains configs/quickstart.py (Fashion-MNIST, 32 px) for --steps steps with
train.compute_dtype=float32 and then =bfloat16, on the same batches, timesteps and noise
(params and Adam state stay float32 in both), and reports the two loss curves, their
relative gap per window of --window steps, and the x0 error per timestep bucket of the
final params (not the EMA, which lags at short lengths) on held-out test images, each
network computing in its own dtype. Prints a Markdown table of the x0 errors.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

DTYPES = ("float32", "bfloat16")


def train_both(steps: int, x0_examples: int = 256, buckets: int = 10, window: int = 10,
               seed: int = 0) -> dict:
  """{"losses": {dtype: [steps floats]}, "window_gap": [max over dtypes' windowed means
  of |bf16 − fp32| / fp32], "x0_error": {dtype: analysis.x0_error_by_timestep result}}."""
  import jax  # pylint: disable=import-outside-toplevel

  from configs import quickstart  # pylint: disable=import-outside-toplevel
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import state as state_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.data import input_pipeline
  from diffusion_jax.evaluation import analysis  # pylint: disable=import-outside-toplevel
  from diffusion_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training import train

  out = {"steps": steps, "losses": {}, "x0_error": {}}
  for dtype in DTYPES:
    config = quickstart.get_config()
    config.train.update(compute_dtype=dtype, num_steps=steps, seed=seed)
    components, settings = config_lib.build(config), config_lib.train_settings(config)
    mesh = state_lib.make_mesh(config)
    state, shardings = state_lib.create_train_state(components, settings, mesh)
    step = train.jit_train_step(components, settings, mesh, shardings)
    batches = input_pipeline.create_iterator(config.data, seed)
    to_device = lambda b: {k: jax.device_put(v, state_lib.batch_sharding(mesh)) for k, v in b.items()}
    losses = []
    for _ in range(steps):
      state, metrics = step(state, to_device(next(batches)))
      losses.append(metrics["loss"])
    out["losses"][dtype] = [float(x) for x in jax.device_get(losses)]
    images, _ = evaluate.data_images(config.data, x0_examples, seed + 1, split="test")
    out["x0_error"][dtype] = analysis.x0_error_by_timestep(
        components.model, components.diffusion, jax.device_get(state.params),
        images.astype(np.float32) / 127.5 - 1, jax.random.PRNGKey(seed), buckets)
  means = {d: np.asarray(v).reshape(-1, window).mean(1) for d, v in out["losses"].items()}
  out["window"] = window
  out["window_gap"] = (np.abs(means["bfloat16"] - means["float32"])
                       / means["float32"]).tolist()
  return out


def markdown(result: dict) -> str:
  a, b = result["x0_error"]["float32"], result["x0_error"]["bfloat16"]
  rows = ["| t | x0 error fp32 | x0 error bf16 | bf16 ÷ fp32 |", "|---|---|---|---|"]
  for lo, hi, f, h in zip(a["t_lo"], a["t_hi"], a["x0_mse"], b["x0_mse"]):
    rows.append(f"| {lo}–{hi} | {f:.4f} | {h:.4f} | {h / f:.3f} |")
  return "\n".join(rows)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--x0_examples", type=int, default=256)
  p.add_argument("--window", type=int, default=50)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if args.steps % args.window:
    p.error(f"--steps={args.steps} must be a multiple of --window={args.window}.")
  result = train_both(args.steps, args.x0_examples, window=args.window)
  print(f"loss, mean per {args.window} steps: relative gap bf16 vs fp32 "
        + ", ".join(f"{g:.3f}" for g in result["window_gap"]))
  print(markdown(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
