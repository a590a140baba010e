"""Training: the pure data-parallel step and the loop, `train_and_sample`.

The state, mesh and shardings are `state`'s. With train.fsdp=N, XLA gathers the weights
inside the step and reduce-scatters the gradients. Multi-host runs build the global batch with
`jax.make_array_from_process_local_data`, so the same code runs on one CPU, a GPU box
or a TPU pod slice.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from diffusion_jax import checkpoints
from diffusion_jax import config_lib
from diffusion_jax import ema
from diffusion_jax import models
from diffusion_jax import paths
from diffusion_jax import reporting
from diffusion_jax import state as state_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.sampling import samplers
from diffusion_jax.training import workdir_lock


class NonFiniteLossError(RuntimeError):
  """A NaN/Inf loss, gradient or learning rate under train.nan_policy="halt"."""


def jit_train_step(components: config_lib.Components, settings: config_lib.TrainSettings,
                   mesh: Mesh, shardings):
  """The compiled-on-first-call step (state, global batch) -> (state, metrics), with the
  state sharded as `shardings`, the batch over the mesh and the old state donated. Every
  caller (training, `bench`, the multi-host test) uses this one."""
  return jax.jit(make_train_step(components, settings),
                 in_shardings=(shardings, state_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


def _quarter_stats(t, per_example_loss, num_timesteps):
  """Sums and counts of the loss in each quarter of [0, T): (4,), (4,)."""
  q = jnp.clip(t * 4 // num_timesteps, 0, 3)
  onehot = jax.nn.one_hot(q, 4, dtype=jnp.float32)
  return onehot.T @ per_example_loss, onehot.sum(0)


def _next_learning_rate(schedule, opt_state) -> jax.Array:
  """The learning rate the optimizer's next update applies: `schedule` at the count of
  its ScaleByScheduleState (the committed steps, which lags state.step after dropped
  steps and restarts at 0 for converted checkpoints)."""
  is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)
  states = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_schedule)
            if is_schedule(s)]
  if len(states) != 1:
    raise ValueError(f"Expected one learning-rate schedule in the optimizer state; found "
                     f"{len(states)}. Build the optimizer as config_lib.build_optimizer "
                     "does, with a schedule (e.g. optax.adamw(optax.constant_schedule(lr))).")
  return jnp.asarray(schedule(states[0].count), jnp.float32)


def make_train_step(components: config_lib.Components, settings: config_lib.TrainSettings):
  """The pure step (state, batch) -> (state, metrics); `jit_train_step` compiles it.

  batch: dict of image float32 (B, H, W, C) in [−1, 1] and label int32 (B,), global.
  The step's randomness (t, noise, dropout) comes from fold_in(state.rng, step).
  """
  model, diffusion, tx, objective = components
  rates, accum = settings.ema_rates, settings.grad_accum_steps
  class_cond, schedule = settings.class_cond, settings.learning_rate

  def loss_fn(trainable, objective_state, images, labels, t, weights, noise, dropout_key):
    """trainable: (model params, the objective's trainable part or None)."""
    params, objective_params = trainable
    model_fn = models.bind(model, params, labels if class_cond else None, train=True,
                           dropout_key=dropout_key)
    return objective.loss(model_fn, objective_params, objective_state, images, t, weights,
                          noise)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state: state_lib.TrainState, batch):
    images, labels = batch["image"], batch["label"]
    bsz = images.shape[0]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t, weights = objective.sample_t(state.objective_state, k_t, bsz)
    noise = jax.random.normal(k_noise, images.shape, images.dtype)

    trainable = (state.params, objective.trainable(state.objective_state))
    loss_inputs = lambda *batch_and_key: grad_fn(trainable, state.objective_state,
                                                 *batch_and_key)
    if accum == 1:
      (loss, terms), grads = loss_inputs(images, labels, t, weights, noise, k_drop)
    else:
      micro = lambda a: a.reshape((accum, bsz // accum) + a.shape[1:])
      xs = tuple(micro(a) for a in (images, labels, t, weights, noise))

      def body(carry, inp):
        g_sum, l_sum = carry
        i, (im, lb, tt, w, nz) = inp
        (l, tr), g = loss_inputs(im, lb, tt, w, nz, jax.random.fold_in(k_drop, i))
        return (jax.tree_util.tree_map(jnp.add, g_sum, g), l_sum + l), tr

      zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
      (grads, loss), terms = jax.lax.scan(body, (zeros, 0.0), (jnp.arange(accum), xs))
      grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
      loss = loss / accum
      terms = jax.tree_util.tree_map(lambda a: a.reshape((bsz,) + a.shape[2:]), terms)

    grads, objective_grads = grads
    grad_norm = optax.tree.norm(grads)
    # AdamW's update is finite whenever the gradients, the (committed, so finite) state and
    # the learning rate are, so those are checked instead of the update itself.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(_next_learning_rate(schedule, state.opt_state)))

    def apply(state):
      # The update is computed inside the branch: computed outside and passed in, it and
      # the new moments were materialised, and the optimizer step took 4× as long
      # (PERF_NOTES.md).
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema_params = [
          jax.tree_util.tree_map(lambda e, p, r=r: r * e + (1 - r) * p, e_params, params)
          for r, e_params in zip(ema.decays(rates, settings.posthoc_gammas, state.step),
                                 state.ema_params)]
      objective_state = objective.update(state.objective_state, t, terms, objective_grads)
      return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                           opt_state=opt_state, objective_state=objective_state)

    def drop(state):
      # A non-finite step is dropped under both NaN policies; "halt" then stops on the
      # host at the next log boundary, before any checkpoint could store it.
      return state.replace(step=state.step + 1, nonfinite_steps=state.nonfinite_steps + 1)

    # A branch, not a select over the whole state: the select was one more pass over
    # params, EMAs and both Adam moments every step (PERF_NOTES.md).
    new = jax.lax.cond(finite, apply, drop, state)

    q_sum, q_count = _quarter_stats(t, terms["loss"], diffusion.num_timesteps)
    metrics = {"loss": loss, "mse": jnp.mean(terms["mse"]), "grad_norm": grad_norm,
               "grad_norm_sq": grad_norm**2,
               "lr": schedule(state.step), "finite": finite.astype(jnp.float32),
               "quarter_loss_sum": q_sum, "quarter_count": q_count}
    if "vb" in terms:
      metrics["vb"] = jnp.mean(terms["vb"])
    return new, metrics

  return step_fn


def _summarise(metric_list: list[dict]) -> dict[str, float]:
  """Averages of a log interval's step metrics (one host transfer)."""
  host = jax.device_get(metric_list)
  out = {}
  for k in host[0]:
    if k in ("quarter_loss_sum", "quarter_count"):
      continue
    out[k] = float(np.mean([m[k] for m in host]))
  sums = np.sum([m["quarter_loss_sum"] for m in host], axis=0)
  counts = np.sum([m["quarter_count"] for m in host], axis=0)
  for q in range(4):
    if counts[q]:
      out[f"loss_q{q}"] = float(sums[q] / counts[q])
  return out


class _PreemptionWatch:
  """Says when the loop must save and stop: preemption, or Ctrl-C.

  One process: SIGTERM or SIGINT (Ctrl-C) sets a flag, checked between steps, so the
  current step is saved before exiting; a second Ctrl-C exits at once (exit code 130).
  Several processes: JAX's preemption sync point, which `jax.distributed` wires to
  SIGTERM and to TPU maintenance events on every host; all processes agree on the
  same step to save.
  """

  def __init__(self):
    self.raised = False
    self._previous = {}
    self._multihost = jax.process_count() > 1

  def __enter__(self):
    if not self._multihost and _is_main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.raised and signum == signal.SIGINT:
      os._exit(130)  # pylint: disable=protected-access
    self.raised = True
    if signum == signal.SIGINT:
      print("\nCtrl-C: saving the current step, then exiting (again to exit now).",
            file=sys.stderr, flush=True)

  def reached(self, step: int) -> bool:
    """Call after every step, on every process, with the step count."""
    if self._multihost and not self.raised:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      self.raised = multihost_utils.reached_preemption_sync_point(step)
    return self.raised

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _is_main_thread() -> bool:
  import threading  # pylint: disable=import-outside-toplevel
  return threading.current_thread() is threading.main_thread()


def enable_compilation_cache(setting: str, workdir) -> str | None:
  """Points JAX's persistent compilation cache at `setting` (train.compilation_cache_dir:
  "" = WORKDIR/compilation_cache, gs:// allowed; "none" = off), so that a job restarted
  after preemption loads its compiled step instead of compiling again. Returns the
  folder in use, or None."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=import-outside-toplevel
  if setting == "none":
    return None
  folder = os.fspath(paths.path(setting) if setting else paths.path(workdir) /
                     "compilation_cache")
  if jax.config.jax_compilation_cache_dir != folder:
    cc.reset_cache()  # JAX decides once per process whether to use the cache
    cc.set_cache_dir(folder)
  return folder


def sample_grid(config, model, diffusion, params) -> np.ndarray:
  """config.sample.num_samples images from `params` as uint8 NHWC (every process calls it)."""
  m, n = config.model, jax.device_count()
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.batch_size = -(-sample_config.num_samples // n) * n  # one batch, all devices
  return samplers.generate(model, diffusion, params, sample_config, "",
                           class_cond=m.class_cond, num_classes=m.num_classes,
                           image_shape=(m.image_size, m.image_size, m.in_channels),
                           write=False)["images"]


def train_and_sample(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains (or resumes) to config.train.num_steps; returns the final state.

  Writes into `workdir`: checkpoints/ (Orbax), metrics.jsonl, TensorBoard events,
  samples_<step>.png grids, samples.png and loss_curve.png at the end. Holds
  WORKDIR/trainer.lock while it runs, so a second trainer on the workdir is refused
  (workdir_lock.WorkdirLockedError).
  """
  plan = config_lib.training(config)
  paths.check_writable(workdir)
  finished = _finished_run(config, plan, workdir)
  if finished is not None:
    return finished
  with workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train(config, plan, workdir)


def _finished_run(config, plan: config_lib.Training,
                  workdir: str) -> state_lib.TrainState | None:
  """The saved state when `workdir` already holds a finished run of `config` (trained to
  train.num_steps, final samples written), after saying so; else None."""
  steps = checkpoints.checkpoint_steps(workdir)
  if (not steps or steps[-1] < plan.loop.num_steps or plan.loop.resume_step != -1
      or not paths.exists(paths.path(workdir) / reporting.FINAL_SAMPLES)):
    return None
  try:
    state = checkpoints.restore_state(
        workdir, state_lib.abstract_state(plan.components, plan.settings))
  except Exception:  # pylint: disable=broad-except
    return None  # unreadable or another model: the training path names the problem
  checkpoints.saved_config_matching(workdir, config)  # a different model is an error
  if jax.process_index() == 0:
    print(f"{workdir} already holds a finished run: step {steps[-1]} of "
          f"train.num_steps={plan.loop.num_steps}, samples in "
          f"{paths.path(workdir) / reporting.FINAL_SAMPLES}. Nothing to do.\n"
          "To train further, raise --config.train.num_steps; to draw new samples, use "
          "--mode=sample.", flush=True)
  return state


def _train(config, plan: config_lib.Training, workdir: str) -> state_lib.TrainState:
  loop, components, settings = plan.loop, plan.components, plan.settings
  enable_compilation_cache(loop.compilation_cache_dir, workdir)
  model, diffusion = components.model, components.diffusion
  mesh = state_lib.make_mesh(config)
  data_iter = input_pipeline.create_iterator(config.data, config.data.seed)

  manager = checkpoints.create_manager(workdir, config)
  saves = checkpoints.SaveWatcher(manager)
  state, shardings = state_lib.create_train_state(components, settings, mesh)
  restored = checkpoints.restore_latest(manager, state, shardings, plan.config_json)
  objective_changes = []
  if restored is not None:
    state, iter_state, objective_changes = restored
    data_iter.set_state(iter_state)
    logging.info("Resumed from step %d in %s", int(state.step), workdir)

  step_fn = jit_train_step(components, settings, mesh, shardings)
  writer = reporting.MetricWriter(workdir, enabled=jax.process_index() == 0,
                                  resume_step=int(state.step))
  if objective_changes:  # recorded where the new objective starts
    writer.write_scalars(int(state.step), {"objective_changed": 1.0})
    writer.write_text(int(state.step), "objective_change", "\n".join(objective_changes))
  sharding = state_lib.batch_sharding(mesh)

  def to_global(local):
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}

  step = int(state.step)
  first_step, start_time, last_summary = step, time.time(), {}
  num_steps = loop.num_steps
  pending: list[dict] = []
  last_log_time, last_log_step = time.time(), step
  if writer.enabled and step < num_steps:
    tqdm.write(_plan(loop, workdir, step, mesh, writer.latest("compile_s")))
  # delay: the bar first shows at the first step, after the compile's own line.
  bar = tqdm(total=num_steps, initial=step, disable=jax.process_index() != 0,
             desc="train", unit="step", dynamic_ncols=True, delay=0.1)
  with bar, _PreemptionWatch() as preempted, input_pipeline.Prefetcher(
      data_iter, to_global, loop.prefetch) as prefetcher:
    next_batch = prefetcher.next
    batch, batch_iter_state = next_batch() if step < num_steps else (None, None)
    eta_from = None  # (step, time) where the step time starts being measured
    if batch is not None:
      t0 = time.time()
      with reporting.Spinner("compiling the train step", enabled=writer.enabled):
        step_fn = step_fn.lower(state, batch).compile()
      writer.write_scalars(step, {"compile_s": time.time() - t0})
      last_log_time = time.time()
      eta_from = (step, last_log_time)
    while step < num_steps:
      state, metrics = step_fn(state, batch)
      step += 1
      pending.append(metrics)
      bar.update(1)
      if step < num_steps:  # prefetched while earlier steps ran
        batch, batch_iter_state = next_batch()
      else:
        batch_iter_state = prefetcher.state()
      at_log = step % loop.log_every == 0 or step == num_steps
      at_ckpt = step % loop.checkpoint_every == 0 or step == num_steps
      preempted.reached(step)
      saves.raise_if_failed()
      if at_log:
        interval = len(pending)
        summary = _summarise(pending)
        pending = []
        summary["images_per_s"] = (step - last_log_step) * loop.batch_size / max(
            time.time() - last_log_time, 1e-9)
        last_log_time, last_log_step = time.time(), step
        writer.write_scalars(step, summary)
        last_summary = summary
        bar.set_postfix(loss=f"{summary['loss']:.4f}", img_s=f"{summary['images_per_s']:.1f}")
        if eta_from is not None and writer.enabled and step < num_steps:
          tqdm.write(_eta(eta_from, step, loop))
        eta_from = None
        if summary["finite"] < 1 and loop.nan_policy == "skip":
          dropped = int(state.nonfinite_steps)
          logging.warning("nan_policy=skip: %d step(s) with a non-finite loss or gradient "
                          "dropped so far (%d in the last %d).", dropped,
                          round((1 - summary["finite"]) * interval), interval)
      if (at_log or at_ckpt or preempted.raised) and loop.nan_policy == "halt" and int(
          state.nonfinite_steps):
        last = manager.latest_step()
        raise NonFiniteLossError(
            f"Non-finite loss or gradient before step {step}; "
            + ("no checkpoint was written yet" if last is None else
               f"the last good checkpoint (step {last}) is kept")
            + ". Lower optim.lr, set optim.grad_clip, or use train.nan_policy=skip.")
      if at_ckpt or preempted.raised:
        saves.save(step, state, batch_iter_state, plan.config_json)
        writer.flush()
      if settings.posthoc_gammas and (step % loop.posthoc_ema_every == 0 or step == num_steps):
        ema.save_snapshot(workdir, step, state.ema_params[len(settings.ema_rates):])
      if (loop.sample_every and step % loop.sample_every == 0
          and step < num_steps):  # the final grid is drawn after the loop
        writer.write_image_grid(step, sample_grid(config, model, diffusion,
                                                  state.ema_params[0]))
      if preempted.raised:
        logging.warning("Preempted: saved step %d; exiting.", step)
        break
  if int(state.nonfinite_steps):
    logging.warning("nan_policy=skip dropped %d of %d steps (non-finite loss or gradient).",
                    int(state.nonfinite_steps), step)
  saves.finish()
  outputs = {"checkpoint": os.fspath(checkpoints.checkpoint_dir(workdir) / str(step))}
  recognisable = None
  if step >= num_steps:  # every process samples (the params are global arrays)
    grid = sample_grid(config, model, diffusion, state.ema_params[0])
    writer.write_image_grid(step, grid, final=True)
    if writer.enabled:
      outputs["samples"] = os.fspath(paths.path(workdir) / reporting.FINAL_SAMPLES)
      outputs["loss curve"] = reporting.plot_loss_curve(workdir)
      if loop.classifier:
        recognisable = _recognisability(config, workdir, grid)
        writer.write_scalars(step, {"recognisable_fraction":
                                    recognisable[0]["confident_fraction"]})
  writer.close()
  manager.close()
  if jax.process_index() == 0:
    outputs["metrics"] = os.fspath(paths.path(workdir) / reporting.METRICS_FILE)
    print(_run_summary(step, first_step, num_steps, time.time() - start_time,
                       last_summary.get("loss"), outputs, recognisable), flush=True)
  return state


def _recognisability(config, workdir: str, images: np.ndarray):
  """(score of `images`, score of real held-out images) by the dataset's cached
  classifier (see evaluation.recognisability)."""
  from diffusion_jax.evaluation import recognisability  # pylint: disable=import-outside-toplevel
  classifier = recognisability.classifier_for(config.data, config.model.num_classes, workdir)
  return classifier.score(images), classifier.reference


def _plan(loop: config_lib.LoopSettings, workdir: str, step: int, mesh,
          last_compile_s: float | None) -> str:
  """What a run is about to do, printed before its first compile."""
  devices = f"{mesh.size} {jax.devices()[0].platform} device{'s' * (mesh.size > 1)}"
  if jax.process_count() > 1:
    devices += f" in {jax.process_count()} processes"
  previous = (f" (the last one in this workdir took {last_compile_s:.0f} s)"
              if last_compile_s is not None else "")
  return (f"Plan: steps {step} → {loop.num_steps}, batch {loop.batch_size} over "
          f"{devices}, a checkpoint every {loop.checkpoint_every} steps.\n"
          f"  Outputs in {workdir}: checkpoints/, metrics.jsonl, loss_curve.png, "
          f"{reporting.FINAL_SAMPLES}.\n"
          f"  First the train step compiles{previous}; the time left follows once "
          f"{loop.log_every} steps are measured.")


def _eta(since: tuple[int, float], step: int, loop: config_lib.LoopSettings) -> str:
  """The measured step time since `since` = (step, time) and what it predicts."""
  seconds = (time.time() - since[1]) / max(step - since[0], 1)
  every, num_steps = loop.sample_every, loop.num_steps
  grids = len(range(every * (step // every + 1), num_steps, every)) if every else 0
  extras = [f"{grids} sample grid{'s' * (grids > 1)}"] if grids else []
  extras.append("the final samples"
                + (" and their recognisability" if loop.classifier else ""))
  return (f"Step time {seconds:.3f} s (steps {since[0] + 1}–{step}) → about "
          f"{reporting.duration(seconds * (num_steps - step))} for the "
          f"{num_steps - step} steps left, plus {', '.join(extras)}.")


def _run_summary(step, first_step, num_steps, wall_s, loss, outputs, recognisable) -> str:
  """The end-of-run message: what was trained and where everything went."""
  done = "Finished" if step >= num_steps else "Stopped"
  lines = [f"{done} at step {step} of {num_steps}: {step - first_step} steps in "
           f"{reporting.duration(wall_s)}"
           + (f", final loss {loss:.4f} (mean of the last log interval)." if loss is not None
              else ".")]
  if recognisable is not None:
    from diffusion_jax.evaluation import recognisability  # pylint: disable=import-outside-toplevel
    lines.append("  " + recognisability.summary_line(*recognisable))
  width = max(len(k) for k in outputs) + 1
  lines += [f"  {name + ':':<{width}} {where}" for name, where in outputs.items()]
  return "\n".join(lines)
