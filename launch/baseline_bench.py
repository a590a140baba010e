"""Times the paper's official PyTorch code as the baseline for side-by-side benchmarks.

  python3 launch/baseline_bench.py --case paper256 --batch 8 --device cuda --dtype bfloat16

Measures, in one process and printed as one JSON line:
  * the official training step (forward, debias-weighted hybrid loss, backward, AdamW) in
    images/s, the same step `../shared/baseline/ref_step.py` times, with an optional
    `torch.autocast` bf16 row that the official runner lacks (in that row the attention
    block's always-on gradient checkpoint is off: its recomputation runs outside autocast);
  * the official `ddim_sample_loop` in image-steps/s (`--sample_steps` DDIM steps).
The official code is imported at run time from `--baseline_dir` (default: the
`../shared/baseline/debias` checkout beside this repository, or $DIFFUSION_BASELINE); it is
never copied into or imported by the `diffusion_jax` package. Cases match `run_ref_step.sh`:
small32 (= configs/bench_cpu_small.py), paper64, paper256 (= configs/celebahq256.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

PAPER = dict(num_channels=128, num_res_blocks=1, attention_resolutions="16", num_head_channels=64,
             resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True, dropout=0.0,
             diffusion_steps=1000, noise_schedule="linear", rescale_learned_sigmas=True)
CASES = {
    "small32": dict(PAPER, image_size=32, num_channels=64, num_head_channels=32),
    "paper64": dict(PAPER, image_size=64),
    "paper256": dict(PAPER, image_size=256),
}
DEFAULT_BATCH = {"small32": 16, "paper64": 4, "paper256": 8}
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                           "baseline", "debias")


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--case", choices=sorted(CASES), default="small32")
  p.add_argument("--batch", type=int, default=0, help="0: the case's batch")
  p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="bfloat16: torch.autocast around forward and loss (params stay fp32)")
  p.add_argument("--steps", type=int, default=10, help="timed train steps (median reported)")
  p.add_argument("--sample_steps", type=int, default=20, help="DDIM steps per timed loop; 0: skip")
  p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
  p.add_argument("--profile", type=int, default=0,
                 help="also trace this many train steps with torch.profiler and print the "
                      "top ops by self time (a Markdown table, JSON key 'profile')")
  p.add_argument("--baseline_dir", default=os.environ.get("DIFFUSION_BASELINE", DEFAULT_DIR))
  args = p.parse_args(argv)
  if not os.path.isdir(os.path.join(args.baseline_dir, "guided_diffusion")):
    p.error(f"no official code at {args.baseline_dir} (expected guided_diffusion/ inside); "
            "pass --baseline_dir or set DIFFUSION_BASELINE")
  if args.steps < 1 or args.sample_steps < 0 or args.batch < 0:
    p.error("--steps must be ≥ 1, --sample_steps and --batch ≥ 0")
  return args


def main(argv=None) -> dict:
  args = _parse(argv)
  sys.path.insert(0, os.path.abspath(args.baseline_dir))
  from guided_diffusion import script_util  # pylint: disable=import-outside-toplevel
  from guided_diffusion import unet  # pylint: disable=import-outside-toplevel
  from guided_diffusion.resample import UniformSampler  # pylint: disable=import-outside-toplevel
  import torch as th  # pylint: disable=import-outside-toplevel

  if args.dtype == "bfloat16":
    # The official attention block always recomputes its forward in backward, outside the
    # autocast region, which fails on bf16 inputs; the bf16 row therefore keeps activations.
    unet.checkpoint = lambda func, inputs, params, flag: func(*inputs)

  th.set_num_threads(args.threads)
  dev = args.device
  cfg = CASES[args.case]
  bs = args.batch or DEFAULT_BATCH[args.case]
  size = cfg["image_size"]
  build = dict(script_util.model_and_diffusion_defaults(), **cfg)
  with contextlib.redirect_stdout(io.StringIO()):  # the official code prints while building
    model, diffusion = script_util.create_model_and_diffusion(**build)
    ddim = script_util.create_model_and_diffusion(
        **dict(build, timestep_respacing=f"ddim{args.sample_steps}"))[1] if args.sample_steps else None
  model.to(dev)
  opt = th.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
  sampler = UniformSampler(diffusion)
  x = th.rand(bs, 3, size, size, device=dev) * 2 - 1
  sync = th.cuda.synchronize if dev == "cuda" else (lambda: None)
  autocast = (lambda: th.autocast(dev, dtype=th.bfloat16)) if args.dtype == "bfloat16" else (
      contextlib.nullcontext)
  if dev == "cuda":
    th.cuda.reset_peak_memory_stats()

  def train_step():
    opt.zero_grad()
    t, w = sampler.sample(bs, dev)
    with autocast():
      loss = (diffusion.training_losses(model, x, t)["loss"] * w).mean()
    loss.backward()
    opt.step()

  times = []
  for _ in range(args.steps + 3):
    t0 = time.perf_counter()
    train_step()
    sync()
    times.append(time.perf_counter() - t0)
  train_s = statistics.median(times[3:])
  profile = None
  if args.profile:
    from torch import profiler  # pylint: disable=import-outside-toplevel
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
      for _ in range(args.profile):
        train_step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    profile = [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / args.profile,
                "share": e.self_cpu_time_total / total, "calls_per_step": e.count / args.profile}
               for e in events]
  result = {"implementation": "official (PyTorch)", "case": args.case, "device": dev,
            "device_name": th.cuda.get_device_name() if dev == "cuda" else "cpu",
            "torch": th.__version__, "compute_dtype": args.dtype, "batch_size": bs,
            "train_step_s": train_s, "train_images_per_s": bs / train_s}
  if args.sample_steps:
    loops = []
    model.eval()
    with th.no_grad(), autocast():
      for _ in range(3):
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar ignores progress=False
          ddim.ddim_sample_loop(model, (bs, 3, size, size), device=dev, progress=False)
        sync()
        loops.append(time.perf_counter() - t0)
    loop_s = statistics.median(loops[1:])
    result.update(sample_steps=args.sample_steps,
                  sample_image_steps_per_s=bs * args.sample_steps / loop_s)
  if dev == "cuda":
    result["peak_device_memory_gb"] = th.cuda.max_memory_allocated() / 2**30
  if profile:
    result["profile"] = profile
    print(f"self CPU time per step {sum(r['ms_per_step'] for r in profile):.0f} ms\n\n"
          "| # | op | ms/step | share | calls/step |\n|---|---|---|---|---|", file=sys.stderr)
    for i, r in enumerate(profile[:10], 1):
      print(f"| {i} | {r['op']} | {r['ms_per_step']:.1f} | {r['share']:.1%} | "
            f"{r['calls_per_step']:.0f} |", file=sys.stderr)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
