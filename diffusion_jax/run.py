"""A trained run: opening a workdir to sample from it or evaluate it.

One home for what inference needs from a workdir: the config saved with its
checkpoints, the latest or a given TrainState, one EMA copy chosen by rate, the model
bound to those params, and `--mode=sample`. Evaluation (`evaluation/`) opens runs here.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from diffusion_jax import checkpoints
from diffusion_jax import config_lib
from diffusion_jax import models
from diffusion_jax import paths
from diffusion_jax import state as state_lib
from diffusion_jax.sampling import samplers


def load_checkpoint(workdir: str, step: int | None = None) -> state_lib.TrainState:
  """The saved TrainState of `workdir` (latest, or `step`), as host-local arrays.

  Rebuilds the state's structure from the config stored with the checkpoint, so no
  config is needed. Raises checkpoints.NoCheckpointError when there is none.
  """
  config = checkpoints.saved_config(workdir, step)
  abstract = state_lib.abstract_state(config_lib.build(config), config_lib.train_settings(config))
  return checkpoints.restore_state(workdir, abstract, step)


def ema_index(saved_config, rate: float, field: str = "ema_rate") -> int:
  """Position of EMA `rate` in a checkpoint's ema_params (-1: the first)."""
  rates = list(saved_config.optim.ema_rates)
  if rate == -1:
    return 0
  if rate not in rates:
    raise ValueError(f"{field}={rate} is not among the checkpoint's EMA rates {rates}.")
  return rates.index(rate)


@dataclasses.dataclass
class Run:
  """One trained model: the EMA params of one checkpoint and its saved config."""
  label: str
  workdir: str
  config: ml_collections.ConfigDict
  params: dict
  train_step: int
  objective_state: dict | None = None  # e.g. a learned weighting's u(log-SNR) network

  @property
  def model(self):
    return config_lib.build_model(self.config)

  @property
  def diffusion(self):
    return config_lib.build_diffusion(self.config)

  @property
  def objective(self):
    return config_lib.build_objective(self.config, self.diffusion)

  def model_fn(self, labels=None):
    """model_fn(x, t) of this run's params (labels: (B,) int32 for a class-conditional
    model, else None)."""
    return models.bind(self.model, self.params, labels)


def open_run(workdir: str, label: str = "", ema_rate: float = -1,
             step: int | None = None) -> Run:
  """`workdir`'s checkpoint (latest, or `step`) with the EMA of rate `ema_rate`
  (-1: the first), labelled `label` (default: the run's weighting)."""
  saved = checkpoints.saved_config(workdir, step)
  state = load_checkpoint(workdir, step)
  return Run(label=label or saved.diffusion.weighting, workdir=workdir, config=saved,
             params=state.ema_params[ema_index(saved, ema_rate, "eval.ema_rate")],
             train_step=int(state.step), objective_state=state.objective_state)


def sample_from_workdir(config, workdir: str) -> dict:
  """--mode=sample: config.sample's sampler on the latest checkpoint's EMA params.

  Uses the EMA whose rate is config.sample.ema_rate (-1: the first). Writes into
  WORKDIR/samples/<sampler>_<steps>/ (…_cfg<scale>/ with guidance; see
  `samplers.generate`) and returns generate's result with "dir" and "files" (the paths
  written; in a multi-host job every process samples its share of each batch and
  process 0 writes). Finished batches are kept as they finish, so an interrupted run
  continues where it stopped when rerun.
  """
  config_lib.validate_sample_fields(config)
  saved = checkpoints.saved_config_matching(workdir, config)
  state = load_checkpoint(workdir)
  params = state.ema_params[ema_index(saved, config.sample.ema_rate, "sample.ema_rate")]
  s = config.sample
  guidance = f"_cfg{s.guidance_scale:g}" if s.guidance_scale != 1 else ""
  if guidance and (s.guidance_t_min, s.guidance_t_max) != (0, 1):
    guidance += f"_t{s.guidance_t_min:g}-{s.guidance_t_max:g}"
  out_dir = os.fspath(paths.path(workdir) / "samples" / f"{s.sampler}_{s.steps}{guidance}")
  m = config.model
  result = samplers.generate(
      config_lib.build_model(config), config_lib.build_diffusion(config), params, s, out_dir,
      class_cond=m.class_cond, num_classes=m.num_classes,
      image_shape=(m.image_size, m.image_size, m.in_channels),
      write=jax.process_index() == 0,
      resume_key=f"step {int(state.step)} {config_lib.to_json(config.sample)} "
                 f"{config_lib.to_json(config.model)}")
  result["dir"] = out_dir
  result["files"] = [os.fspath(paths.path(out_dir) / "samples_grid.png")] + (
      [os.fspath(paths.path(out_dir) / "samples.npz")] if s.save_npz else []) + (
      [os.fspath(paths.path(out_dir) / "images")] if s.save_individual else [])
  return result
