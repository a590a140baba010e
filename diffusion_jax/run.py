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
from diffusion_jax import ema
from diffusion_jax import models
from diffusion_jax import noisy_classifier
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


def _abstract_params(saved_config):
  return state_lib.abstract_state(config_lib.build(saved_config),
                                  config_lib.train_settings(saved_config)).params


def _posthoc_profiles(saved_config, workdir: str) -> tuple:
  stds = tuple(saved_config.train.get("posthoc_ema", ()))
  if not stds:
    raise ValueError(f"{workdir} was trained without train.posthoc_ema, so it has no "
                     "snapshots to reconstruct from; train with e.g. "
                     "--config.train.posthoc_ema='(0.05, 0.1)'.")
  return stds


def reconstruct_posthoc_ema(workdir: str, sigma_rel: float) -> dict:
  """--mode=posthoc_ema: the post-hoc EMA of `sigma_rel` at the run's last snapshot,
  written where sample.posthoc_ema finds it (ema.reconstruct; returns its summary)."""
  saved = checkpoints.saved_config(workdir)
  return ema.reconstruct(workdir, _posthoc_profiles(saved, workdir), _abstract_params(saved),
                         sigma_rel)


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

  def with_posthoc_ema(self, sigma_rel: float) -> tuple["Run", dict]:
    """This run with the post-hoc EMA of `sigma_rel` (at its last snapshot, reconstructed
    in memory) as its params, and the reconstruction's summary (ema.reconstruct_params)."""
    params, summary = ema.reconstruct_params(
        self.workdir, _posthoc_profiles(self.config, self.workdir),
        _abstract_params(self.config), sigma_rel)
    return dataclasses.replace(self, params=params, train_step=summary["step"]), summary

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

  Uses the EMA whose rate is config.sample.ema_rate (-1: the first), or the post-hoc EMA
  of σ_rel config.sample.posthoc_ema when it is not 0. Writes into
  WORKDIR/samples/<sampler>_<steps>/ (…_cfg<scale> with guidance, …_churn<S_churn>,
  …_phema<σ_rel>, …_cg<classifier scale>; see `samplers.generate`) and returns generate's result with "dir" and "files" (the paths
  written; in a multi-host job every process samples its share of each batch and
  process 0 writes). Finished batches are kept as they finish, so an interrupted run
  continues where it stopped when rerun.
  """
  config_lib.validate_sample_fields(config)
  saved = checkpoints.saved_config_matching(workdir, config)
  s = config.sample
  if s.posthoc_ema:
    params, step = ema.load_reconstructed(workdir, s.posthoc_ema, _abstract_params(saved))
  else:
    state = load_checkpoint(workdir)
    params = state.ema_params[ema_index(saved, s.ema_rate, "sample.ema_rate")]
    step = int(state.step)
  suffix = f"_cfg{s.guidance_scale:g}" if s.guidance_scale != 1 else ""
  if suffix and (s.guidance_t_min, s.guidance_t_max) != (0, 1):
    suffix += f"_t{s.guidance_t_min:g}-{s.guidance_t_max:g}"
  suffix += (f"_churn{s.s_churn:g}" if s.s_churn else "") + (
      f"_phema{s.posthoc_ema:g}" if s.posthoc_ema else "") + (
      f"_cg{s.classifier_scale:g}" if s.classifier_scale else "")
  classifier, classifier_step = None, None
  if s.classifier_scale:
    config_lib.validate_classifier(config)
    *classifier, classifier_step = noisy_classifier.load_params(config, workdir)
  out_dir = os.fspath(paths.path(workdir) / "samples" / f"{s.sampler}_{s.steps}{suffix}")
  m = config.model
  result = samplers.generate(
      config_lib.build_model(config), config_lib.build_diffusion(config), params, s, out_dir,
      class_cond=m.class_cond, num_classes=m.num_classes,
      image_shape=(m.image_size, m.image_size, m.in_channels),
      write=jax.process_index() == 0,
      classifier=classifier,
      resume_key=f"step {step} classifier {classifier_step} "
                 f"{config_lib.to_json(config.sample)} "
                 f"{config_lib.to_json(config.model)}")
  result["dir"] = out_dir
  result["files"] = [os.fspath(paths.path(out_dir) / "samples_grid.png")] + (
      [os.fspath(paths.path(out_dir) / "samples.npz")] if s.save_npz else []) + (
      [os.fspath(paths.path(out_dir) / "images")] if s.save_individual else [])
  return result
