"""Gradient noise of each weighting under uniform and importance-sampled timesteps.

  python3 launch/grad_variance.py --workdir=workdirs/quickstart [--draws=32] [--batch=16]

Loads the run's EMA params (`run.open_run`) and one fixed batch of its training data,
then for each weighting in --weightings and each timestep sampler in --samplers measures
`analysis.gradient_variance` (the total variance of the batch gradient over draws of t
and ε) and prints a Markdown table with the ratio importance ÷ uniform per weighting.
The objective is the same for both samplers (diffusion_jax/core/objective/tdensity.py), so a ratio below 1 is less
gradient noise for the same expected gradient.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--weightings", default="debias,constant")
  p.add_argument("--samplers", default="uniform,importance")
  p.add_argument("--draws", type=int, default=32)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import run  # pylint: disable=import-outside-toplevel
  from diffusion_jax.data import input_pipeline
  from diffusion_jax.evaluation import analysis  # pylint: disable=import-outside-toplevel

  trained = run.open_run(args.workdir)
  data = trained.config.data.copy_and_resolve_references()
  data.batch_size = args.batch
  batch = next(input_pipeline.create_iterator(data, args.seed))
  images = jnp.asarray(batch["image"], jnp.float32)
  labels = jnp.asarray(batch["label"]) if trained.config.model.class_cond else None
  results = {}
  for weighting in args.weightings.split(","):
    for sampler in args.samplers.split(","):
      config = trained.config.copy_and_resolve_references()
      config.diffusion.weighting, config.diffusion.timestep_sampler = weighting, sampler
      results[f"{weighting}+{sampler}"] = analysis.gradient_variance(
          trained.model, config_lib.build(config).objective, trained.params, images,
          jax.random.PRNGKey(args.seed), labels=labels, draws=args.draws)
  samplers = args.samplers.split(",")
  print(f"{args.workdir} (step {trained.train_step}), batch {args.batch}, "
        f"{args.draws} draws of t and ε\n")
  print("| weighting | " + " | ".join(f"{s}: E‖g−ḡ‖²" for s in samplers)
        + " | " + " | ".join(f"{s}: ‖ḡ‖" for s in samplers) + f" | ratio {samplers[-1]} ÷ "
        f"{samplers[0]} |")
  print("|---" * (2 * len(samplers) + 2) + "|")
  for weighting in args.weightings.split(","):
    r = [results[f"{weighting}+{s}"] for s in samplers]
    print(f"| {weighting} | " + " | ".join(f"{x['trace_var']:.4g}" for x in r) + " | "
          + " | ".join(f"{x['mean_norm']:.4g}" for x in r)
          + f" | {r[-1]['trace_var'] / r[0]['trace_var']:.3f} |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
