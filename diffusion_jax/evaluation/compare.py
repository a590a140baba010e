"""--mode=compare: train each of config.compare.weightings with identical seeds, data and
steps into WORKDIR/runs/<name>/, evaluate them together into WORKDIR/compare/, and write
WORKDIR/report.md and report.json.

A run is "weighting[+timestep density]", e.g. "debias+importance"; a finished run with
the same objective is reused, an unfinished one resumes.
"""
from __future__ import annotations

import os

import jax
from tqdm.auto import tqdm

from diffusion_jax import checkpoints
from diffusion_jax import config_lib
from diffusion_jax import paths
from diffusion_jax import run as run_lib
from diffusion_jax.core import objective as objective_lib
from diffusion_jax.evaluation import analysis
from diffusion_jax.evaluation import evaluate
from diffusion_jax.training import train


def validate_compare_config(config) -> None:
  """Raises ValueError naming the first bad config.eval or config.compare field."""
  evaluate.validate_eval_config(config)
  names = config_lib.name_list(config.compare.weightings)
  unknown = [n for n in names if _run_spec(n, config) is None]
  specs = {_run_spec(n, config) for n in names}
  if len(names) < 2 or unknown or len(specs) != len(names):
    raise ValueError(
        f"config.compare.weightings={config.compare.weightings!r}: give two or more "
        f"distinct runs, each a weighting from {objective_lib.available()}, optionally "
        f"+ a timestep sampler from {list(objective_lib.tdensity.DENSITY_NAMES)} "
        "(e.g. 'constant,debias,debias+importance')."
        + (f" Not understood: {unknown}." if unknown else ""))


def _run_spec(name: str, config):
  """(weighting, timestep sampler) of a compare entry "weighting[+sampler]" (the sampler
  defaults to config.diffusion.timestep_sampler), or None when it names neither."""
  weighting, _, sampler = name.partition("+")
  sampler = sampler or config.diffusion.timestep_sampler
  if (weighting not in objective_lib.available()
      or sampler not in objective_lib.tdensity.DENSITY_NAMES):
    return None
  return weighting, sampler


def _trained_run_config(config, name: str):
  sub = config.copy_and_resolve_references()
  sub.diffusion.weighting, sub.diffusion.timestep_sampler = _run_spec(name, config)
  return sub


class TrainingStopped(KeyboardInterrupt):
  """A compare run's training was stopped by a signal (preemption, Ctrl-C) after saving:
  the comparison stops too, as after Ctrl-C, and the same command resumes it."""


def _train_or_reuse(sub_config, run_dir: str, name: str) -> None:
  """Trains into run_dir, resuming; a finished run of the same objective is reused."""
  steps = checkpoints.checkpoint_steps(run_dir)
  if steps:
    saved = checkpoints.saved_config(run_dir)
    mismatch = sum(config_lib.saved_differences(config_lib.as_json_dict(saved), sub_config),
                   [])
    if mismatch:
      raise checkpoints.CheckpointConfigError(
          f"{run_dir} holds a run with a different configuration:\n  " + "\n  ".join(mismatch)
          + "\nUse a new --workdir; nothing was changed.")
    if steps[-1] >= sub_config.train.num_steps:
      tqdm.write(f"[{name}] reusing the finished run in {run_dir} (step {steps[-1]})")
      return
  tqdm.write(f"[{name}] training into {run_dir}")
  state = train.train_and_sample(sub_config, run_dir)
  if int(state.step) < sub_config.train.num_steps:  # SIGTERM/Ctrl-C: saved, then stopped
    raise TrainingStopped(f"[{name}] stopped at step {int(state.step)} of "
                          f"{sub_config.train.num_steps} (checkpoint saved in {run_dir}).")


def compare(config, workdir: str) -> dict:
  """--mode=compare: train each of config.compare.weightings, evaluate them together."""
  config = config_lib.with_eval_preset(config)
  validate_compare_config(config)
  config_lib.validate_config(config)
  names = config_lib.name_list(config.compare.weightings)
  join = lambda *parts: os.fspath(paths.path(workdir).joinpath(*parts))
  for name in names:
    _train_or_reuse(_trained_run_config(config, name), join("runs", name), name)
  runs = [run_lib.open_run(join("runs", n), n, config.eval.ema_rate) for n in names]
  report = evaluate.evaluate_runs(runs, config, join("compare"), workdir,
                                  report_path=join("report.md"))
  if jax.process_index() == 0:
    analysis.write_json(report, join("report.json"))
  return report
