"""--mode=evaluate and --mode=compare: sample quality and the paper's analyses.

  evaluate_workdir(config, workdir)  metrics and plots for a workdir's checkpoint(s),
                                     into WORKDIR/eval/
  compare(config, workdir)           trains config.compare.weightings with identical
                                     seeds, data and steps into WORKDIR/runs/<name>/,
                                     evaluates them together, writes WORKDIR/report.md,
                                     report.json and the PNG plots

What is measured is set by config.eval (see configs/default.py). Every FID figure
carries its sample count; the reference statistics come from config.eval.reference_npz
or from config.eval.num_reference training images (cached under WORKDIR).
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import checkpoints
from diffusion_jax import config_lib
from diffusion_jax import distributed
from diffusion_jax import input_pipeline
from diffusion_jax import models
from diffusion_jax import paths
from diffusion_jax import reporting
from diffusion_jax import run as run_lib
from diffusion_jax import samplers
from diffusion_jax import train
from diffusion_jax import objective as objective_lib
from diffusion_jax.evaluation import analysis
from diffusion_jax.evaluation import inception as inception_lib
from diffusion_jax.evaluation import metrics


_ints, _names = config_lib.int_list, config_lib.name_list


def validate_eval_config(config, compare_mode: bool = False) -> None:
  """Raises ValueError naming the first bad config.eval / config.compare field."""
  config_lib.validate_eval_fields(config)
  e = config.eval
  if e.reference_npz and not paths.exists(e.reference_npz):
    raise ValueError(f"config.eval.reference_npz={e.reference_npz!r} does not exist.")
  if compare_mode:
    names = _names(config.compare.weightings)
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


def weight_curve(run: run_lib.Run) -> dict | None:
  """A stateful weighting's effective weight on the MSE at every t (e.g. w₀(t)/exp(u(λ_t))
  for `learned`) and its base weighting's w₀(t): {"t", "effective", "base", "base_name"}
  as lists; None for a fixed weighting."""
  objective = run.objective
  if objective.term is None:
    return None
  effective = objective.effective_weight(run.objective_state)
  return {"t": list(range(len(effective))), "effective": effective.tolist(),
          "base": objective.loss_weight.tolist(), "base_name": objective.term.base}


def data_images(data_config, num: int, seed: int, split: str | None = None):
  """(uint8 images (num, H, W, C), int32 labels): a fixed random subset of a split."""
  data_config = data_config.copy_and_resolve_references()
  if split is not None:
    data_config.split = split
  source = input_pipeline.get_source(data_config)
  if num > len(source):
    raise ValueError(f"Asked for {num} images but {data_config.dataset} "
                     f"({data_config.split}) has {len(source)}; lower the eval count.")
  idx = np.sort(np.random.default_rng(seed).choice(len(source), num, replace=False))
  records = [source[int(i)] for i in idx]
  return (np.stack([np.asarray(r["image"], np.uint8) for r in records]),
          np.asarray([r["label"] for r in records], np.int32))


def _reference_cache_path(config, cache_dir) -> str:
  e, d = config.eval, config.data
  name = d.dataset.replace(":", "_").replace("/", "_")
  return os.fspath(paths.path(cache_dir) / f"reference_{name}_{d.image_size}px_{d.split}_"
                   f"{e.num_reference}_seed{e.seed}.npz")


def reference_statistics(config, inception, cache_dir: str, *, cached: bool | None = None,
                         write: bool = True) -> dict:
  """config.eval.reference_npz if set, else training-data statistics cached in cache_dir.
  cached: whether to load the cache (None: if it exists); write: whether to write it
  after computing (see recognisability.classifier_for)."""
  e, d = config.eval, config.data
  if e.reference_npz:  # checked here, before any analysis runs
    reference = metrics.load_reference(e.reference_npz, inception)
    metrics.check_reference_dim(reference, inception_lib.POOL_DIM, e.reference_npz)
    return reference
  path = _reference_cache_path(config, cache_dir)
  if paths.exists(path) if cached is None else cached:
    return metrics.load_reference(path)
  tqdm.write(f"Reference statistics: {e.num_reference} {d.dataset} images → {path}")
  images, _ = data_images(d, e.num_reference, e.seed)
  ref = metrics.reference_from_features(inception.features_uint8(images),
                                        f"{d.dataset} {d.split} ({e.num_reference} images)")
  if write:
    metrics.save_reference(ref, path)
  return ref


def sample_images(run: run_lib.Run, sampler: str, steps: int, num: int, batch_size: int,
                  seed: int, solver_settings=None) -> np.ndarray:
  """uint8 samples of `run`; the same seed gives every run the same starting noise.
  solver_settings: order, skip_type and thresholding (default: config.sample's defaults)."""
  m = run.config.model
  n_dev = jax.device_count()
  batch = max(n_dev, min(batch_size, num) // n_dev * n_dev)
  sample_config = ml_collections.ConfigDict(dict(
      sampler=sampler, steps=steps, eta=0.0, num_samples=num, batch_size=batch,
      clip_denoised=True, seed=seed, save_npz=False, save_individual=False,
      **{**samplers.SOLVER_DEFAULTS, "thresholding": False, **(solver_settings or {})}))
  return samplers.generate(run.model, run.diffusion, run.params, sample_config, "",
                           class_cond=m.class_cond, num_classes=m.num_classes,
                           image_shape=(m.image_size, m.image_size, m.in_channels),
                           write=False)["images"]


def _to_rgb(images: np.ndarray) -> np.ndarray:
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _quality(images, inception, reference, classifier=None) -> dict:
  quality = metrics.sample_quality(inception.features_uint8(_to_rgb(images)), reference)
  quality["static_fraction"] = analysis.static_fraction(images)
  if classifier is not None:
    quality["recognisable"] = classifier.score(images)
  return quality


class _Points:
  """Finished pieces of an evaluation, kept in OUT/points.json (arrays beside it in
  OUT/points/) as soon as each exists, so that an interrupted evaluation keeps them and
  a rerun reuses every piece whose settings (run, checkpoint step, counts, seeds,
  reference) are unchanged."""

  def __init__(self, out_dir, write: bool = True):
    self.file = paths.path(out_dir) / "points.json"
    self.array_dir = paths.path(out_dir) / "points"
    self.entries = json.loads(paths.read_text(self.file)) if paths.exists(self.file) else {}
    self.reused: list[str] = []
    self.write = write

  @staticmethod
  def _normal(obj):
    return json.loads(json.dumps(obj, default=lambda o: np.asarray(o).tolist()))

  def get(self, name: str, settings: dict):
    """(value, arrays) stored under `name` with equal settings, else None."""
    entry = self.entries.get(name)
    if entry is None or entry["settings"] != self._normal(settings):
      return None
    arrays = (paths.load_npz(self.array_dir / entry["arrays"]) if entry.get("arrays")
              else {})
    self.reused.append(name)
    return entry["value"], arrays

  def put(self, name: str, settings: dict, value, arrays: dict | None = None):
    entry = {"settings": self._normal(settings), "value": self._normal(value)}
    if arrays:
      entry["arrays"] = name.replace("/", "_") + ".npz"
      if self.write:
        paths.save_npz(self.array_dir / entry["arrays"], **arrays)
    self.entries[name] = entry
    if self.write:
      analysis.write_json(self.entries, self.file)
    return entry["value"]


def _int_keys(table: dict) -> dict:
  return {int(k): v for k, v in table.items()}


def _work_plan(runs: list[run_lib.Run], config, cached_reference: bool) -> dict:
  """Network evaluations (images × sampler steps) and Inception images of each piece."""
  e = config.eval
  plan = {}
  for r in runs:
    plan[f"x0/{r.label}"] = (e.x0_buckets * e.x0_num_examples, 0)
    plan[f"colour/{r.label}"] = (
        e.colour_num_samples * sum(_ints(e.colour_steps, "eval.colour_steps")), 0)
    for sampler in _names(e.samplers):
      for s in _ints(e.steps, "eval.steps"):
        plan[f"fid/{r.label}/{sampler}/{s}"] = (e.num_samples * s, e.num_samples)
    if e.train_curve:
      for step in checkpoints.checkpoint_steps(r.workdir):
        plan[f"curve/{r.label}/{step}"] = (e.num_samples * e.train_curve_steps,
                                           e.num_samples)
  if not cached_reference:
    plan["reference"] = (0, e.num_reference)
  return plan


class _Progress:
  """Prints the work before it starts, with an ETA from measured per-unit costs, and
  after each piece the time spent and left."""

  def __init__(self, plan: dict, seconds_per_nfe: float, seconds_per_inception: float):
    self.plan = plan
    self.cost = {name: nfe * seconds_per_nfe + inc * seconds_per_inception
                 for name, (nfe, inc) in plan.items()}
    self.left = dict(self.cost)
    self.start = time.time()
    nfe = sum(a for a, _ in plan.values())
    inc = sum(b for _, b in plan.values())
    tqdm.write(f"Evaluation: {len(plan)} pieces, {nfe:,} network evaluations (images × "
               f"steps) and {inc:,} Inception images; about {reporting.duration(sum(self.cost.values()))}"
               f" here ({seconds_per_nfe * 1e3:.2f} ms per image-step, "
               f"{seconds_per_inception * 1e3:.0f} ms per Inception image, measured; "
               "pieces saved by an earlier run with the same settings are reused).")

  def skip(self, name: str) -> None:
    """A piece reused from an earlier run: it takes no time."""
    self.cost.pop(name, None)
    self.left.pop(name, None)

  def done(self, name: str) -> None:
    self.left.pop(name, None)
    elapsed = time.time() - self.start
    spent = sum(self.cost.values()) - sum(self.left.values())
    remaining = sum(self.left.values()) * (elapsed / spent if spent > 0 else 1.0)
    tqdm.write(f"  done: {name} ({len(self.cost) - len(self.left)}/{len(self.cost)}); "
               f"{reporting.duration(elapsed)} so far, about {reporting.duration(remaining)} left")


def _unit_costs(run: run_lib.Run, inception, config) -> tuple[float, float]:
  """Measured seconds per network evaluation of one image, and per Inception image
  (each timed on a second call, after compiling)."""
  e, m = config.eval, run.config.model
  n_dev = jax.device_count()
  batch = max(n_dev, min(e.batch_size, e.num_samples) // n_dev * n_dev)
  x = jax.numpy.zeros((batch, m.image_size, m.image_size, m.in_channels))
  t = jax.numpy.zeros((batch,), jax.numpy.int32)
  labels = t if m.class_cond else None
  forward = jax.jit(lambda p, x, t: models.bind(run.model, p, labels)(x, t))
  timings = []
  for _ in range(2):
    t0 = time.time()
    jax.block_until_ready(forward(run.params, x, t))
    timings.append(time.time() - t0)
  nfe = timings[-1] / batch
  images = np.zeros((50, m.image_size, m.image_size, m.in_channels), np.uint8)
  timings = []
  for _ in range(2):
    t0 = time.time()
    inception.features_uint8(_to_rgb(images), progress=False)
    timings.append(time.time() - t0)
  return nfe, timings[-1] / len(images)


def evaluate_runs(runs: list[run_lib.Run], config, out_dir: str, cache_dir: str) -> dict:
  """Every analysis of config.eval over `runs`; writes PNG + JSON into out_dir.

  Each finished piece (x0 errors, colour shift, FID point, training-curve point) is
  saved at once in out_dir/points.json and its plot redrawn, and evaluation.json is
  rewritten (with "complete": false until the end); a rerun reuses saved pieces.

  In a multi-host job every process runs this with the same arguments: each samples
  and computes Inception features for its devices' share of every batch, and process 0
  alone writes files. All processes read the saved pieces and caches before any writes.
  """
  from diffusion_jax.evaluation import recognisability  # pylint: disable=import-outside-toplevel
  config = config_lib.with_eval_preset(config)
  e = config.eval
  primary = jax.process_index() == 0
  out = paths.path(out_dir)
  points = _Points(out_dir, write=primary)
  classifier_cached = e.classifier and paths.exists(
      recognisability.cache_path(runs[0].config.data, cache_dir))
  reference_cached = bool(e.reference_npz) or paths.exists(
      _reference_cache_path(config, cache_dir))
  distributed.barrier("evaluation: saved pieces and caches read")
  if primary:
    paths.makedirs(out_dir)

  def written(path, draw):
    """The path of a file that process 0 writes with draw()."""
    return draw() if primary else os.fspath(path)

  inception = inception_lib.FIDInception.load(e.inception_path or None)
  classifier = None
  if e.classifier:
    classifier = recognisability.classifier_for(
        runs[0].config.data, runs[0].config.model.num_classes, cache_dir,
        cached=classifier_cached, write=primary)
  plan = _work_plan(runs, config, cached_reference=reference_cached)
  with reporting.Spinner("timing the network and Inception for the estimate (compiles both)",
                         enabled=primary):
    unit_costs = _unit_costs(runs[0], inception, config)
  progress = _Progress(plan, *unit_costs)
  reference = reference_statistics(config, inception, cache_dir, cached=reference_cached,
                                   write=primary)
  if "reference" in plan:
    progress.done("reference")
  report = {"complete": False,
            "reference": {"source": reference["source"], "n": int(reference["n"])},
            "runs": {r.label: {"workdir": r.workdir, "train_step": r.train_step} for r in runs},
            "files": {}}
  if classifier is not None:
    report["classifier_reference"] = classifier.reference

  solver_settings = {k: config.sample[k] for k in ("order", "skip_type", "thresholding")}

  def settings(r: run_lib.Run, **more):
    return {"workdir": r.workdir, "train_step": r.train_step, "ema_rate": e.ema_rate,
            "seed": e.seed, **solver_settings, **more}

  def save_report():
    if primary:
      analysis.write_json(report, out / "evaluation.json")

  def piece(name, run_settings, compute):
    """The value of piece `name`: reused when saved with equal settings, else computed
    and saved at once."""
    found = points.get(name, run_settings)
    if found is not None:
      tqdm.write(f"  reusing {name} from {points.file}")
      progress.skip(name)
      return found
    value, arrays = compute()
    value = points.put(name, run_settings, value, arrays)
    progress.done(name)
    return value, arrays

  learned = {r.label: c for r in runs if (c := weight_curve(r)) is not None}
  if learned:
    report["learned_weight"] = learned
    report["files"]["learned_weight"] = written(
        out / "learned_weight.png", lambda: analysis.plot_weight_curves(
            learned, runs[0].diffusion, out / "learned_weight.png"))
    save_report()

  tqdm.write(f"x0 error per timestep on {e.x0_num_examples} held-out images ({e.x0_split})")
  key = jax.random.PRNGKey(e.seed)
  held = {}

  def x0_error(r):
    if not held:
      images, labels = data_images(runs[0].config.data, e.x0_num_examples, e.seed + 1,
                                   split=e.x0_split)
      held.update(images=images.astype(np.float32) / 127.5 - 1, labels=labels)
    return analysis.x0_error_by_timestep(
        r.model, r.diffusion, r.params, held["images"], key, e.x0_buckets,
        labels=held["labels"] if r.config.model.class_cond else None), None

  x0 = {r.label: piece(f"x0/{r.label}", settings(
      r, n=e.x0_num_examples, split=e.x0_split, buckets=e.x0_buckets),
                       lambda r=r: x0_error(r))[0] for r in runs}
  report["x0_error"] = x0
  report["files"]["x0_error"] = written(
      out / "x0_error.png", lambda: analysis.plot_x0_error(x0, out / "x0_error.png"))
  save_report()

  tqdm.write(f"Colour shift: {e.colour_num_samples} {e.colour_sampler} samples per step count")
  data_for_colour, _ = data_images(runs[0].config.data, max(e.num_reference, 2), e.seed)
  colour_steps = _ints(e.colour_steps, "eval.colour_steps")

  def colour(r):
    samples = {s: sample_images(r, e.colour_sampler, s, e.colour_num_samples, e.batch_size,
                                e.seed, solver_settings) for s in colour_steps}
    strip = {str(s): images[:4] for s, images in samples.items()}
    return analysis.colour_shift(samples, data_for_colour), strip

  strips, tables = {}, {}
  for r in runs:
    table, strip = piece(f"colour/{r.label}", settings(
        r, sampler=e.colour_sampler, steps=colour_steps, n=e.colour_num_samples,
        batch_size=e.batch_size, data_n=max(e.num_reference, 2)), lambda r=r: colour(r))
    tables[r.label] = {**table, "steps": _int_keys(table["steps"])}
    strips[r.label] = _int_keys(strip)
  report["colour_shift"] = {"sampler": e.colour_sampler, "tables": tables}
  report["files"]["colour_strip"] = written(
      out / "colour_strip.png", lambda: analysis.plot_colour_strip(
          strips, out / "colour_strip.png"))
  report["files"]["colour_stats"] = written(
      out / "colour_stats.png", lambda: analysis.plot_colour_stats(
          tables, out / "colour_stats.png"))
  save_report()

  tqdm.write(f"FID against sampling steps: {e.num_samples} samples per point")
  quality_settings = dict(n=e.num_samples, batch_size=e.batch_size,
                          reference=report["reference"], classifier=e.classifier)

  def quality(r, sampler, steps):
    images = sample_images(r, sampler, steps, e.num_samples, e.batch_size, e.seed,
                           solver_settings)
    return _quality(images, inception, reference, classifier), None

  fid = {}
  for r in runs:
    fid[r.label] = {}
    for sampler in _names(e.samplers):
      fid[r.label][sampler] = {}
      for s in _ints(e.steps, "eval.steps"):
        value, _ = piece(f"fid/{r.label}/{sampler}/{s}", settings(
            r, sampler=sampler, steps=s, **quality_settings),
                         lambda r=r, sampler=sampler, s=s: quality(r, sampler, s))
        fid[r.label][sampler][s] = value
        tqdm.write(f"  {r.label} {sampler}-{s}: FID {value['fid']:.2f}"
                   + (f", recognisable {value['recognisable']['confident_fraction']:.2f}"
                      if "recognisable" in value else ""))
        report["fid_vs_steps"] = fid
        report["files"]["fid_vs_steps"] = written(
            out / "fid_vs_steps.png", lambda: analysis.plot_fid_vs_steps(
                fid, out / "fid_vs_steps.png", model=_model_title(runs)))
        save_report()

  if e.train_curve:
    sampler = _names(e.samplers)[0]
    curve = {}
    for r in runs:
      curve[r.label] = {}
      for step in checkpoints.checkpoint_steps(r.workdir):
        def curve_point(step=step, r=r):
          run_at = run_lib.open_run(r.workdir, r.label, e.ema_rate, step)
          return quality(run_at, sampler, e.train_curve_steps)
        curve[r.label][step], _ = piece(
            f"curve/{r.label}/{step}",
            {**settings(r, sampler=sampler, steps=e.train_curve_steps, **quality_settings),
             "train_step": step}, curve_point)
        report["fid_vs_train_step"] = {"sampler": sampler, "steps": e.train_curve_steps,
                                       "curve": curve}
        report["files"]["fid_vs_train_step"] = written(
            out / "fid_vs_train_step.png", lambda: analysis.plot_fid_vs_train_step(
                curve, out / "fid_vs_train_step.png", f"{sampler}-{e.train_curve_steps}"))
        save_report()
  report["complete"] = True
  report["reused_pieces"] = points.reused
  report["files"]["evaluation"] = os.fspath(out / "evaluation.json")
  save_report()
  return report


def _model_title(runs: list[run_lib.Run]) -> str:
  """What the runs' plots are of, e.g. "adm_unet on fashion_mnist 32 px, step 2400"."""
  return "; ".join(sorted({
      f"{r.config.model.name} on {r.config.data.dataset} {r.config.model.image_size} px, "
      f"step {r.train_step}" for r in runs}))


def _join(base, *parts) -> str:
  return os.fspath(paths.path(base).joinpath(*parts))


def evaluate_workdir(config, workdir: str) -> dict:
  """--mode=evaluate: the latest checkpoint of `workdir` (every checkpoint for the
  training curve); writes WORKDIR/eval/evaluation.json and the plots."""
  config = config_lib.with_eval_preset(config)
  validate_eval_config(config)
  saved = checkpoints.saved_config_matching(workdir, config)
  run = run_lib.open_run(workdir, saved.diffusion.weighting, config.eval.ema_rate)
  return evaluate_runs([run], config, _join(workdir, "eval"), workdir)


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
    mismatch = checkpoints.model_mismatches(json.loads(config_lib.to_json(saved)), sub_config)
    mismatch += checkpoints.objective_changes(json.loads(config_lib.to_json(saved)),
                                              sub_config)
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


def training_statistics(workdir: str, last_fraction: float = 0.25) -> dict:
  """Gradient noise and loss by timestep over the last `last_fraction` of a run's logged
  intervals (metrics.jsonl): the gradient norm's mean and variance over those steps
  (from each interval's mean of g and g²) and the mean loss per quarter of t."""
  rows = [r for r in reporting.read_metrics(workdir) if "grad_norm" in r]
  rows = rows[-max(1, round(len(rows) * last_fraction)):] if rows else []
  if not rows or "grad_norm_sq" not in rows[0]:
    return {"n_intervals": len(rows)}
  mean = float(np.mean([r["grad_norm"] for r in rows]))
  mean_sq = float(np.mean([r["grad_norm_sq"] for r in rows]))
  out = {"n_intervals": len(rows), "first_step": rows[0]["step"], "last_step": rows[-1]["step"],
         "grad_norm_mean": mean, "grad_norm_var": max(mean_sq - mean**2, 0.0)}
  for q in range(4):
    values = [r[f"loss_q{q}"] for r in rows if f"loss_q{q}" in r]
    out[f"loss_q{q}"] = float(np.mean(values)) if values else None
  return out


def _fmt(value, digits=2):
  return "–" if value is None else f"{value:.{digits}f}"


def write_report(report: dict, config, path: str) -> str:
  """report.md: the tables a reader needs, and the plots."""
  e = config.eval
  labels = list(report["runs"])
  lines = [f"# Weighting comparison: {config.data.dataset}, "
           f"{config.train.num_steps} steps × batch {config.data.batch_size}", "",
           f"Same seeds, data order and steps for every run; EMA params. FID against "
           f"{report['reference']['source']} (n={report['reference']['n']}); "
           f"{e.num_samples} samples per FID point.", ""]
  for sampler in _names(e.samplers):
    steps = _ints(e.steps, "eval.steps")
    recognised = "recognisable" in report["fid_vs_steps"][labels[0]][sampler][steps[-1]]
    lines += [f"## FID / sFID ({sampler})", "",
              "| weighting | " + " | ".join(f"FID@{s}" for s in steps) + " | "
              + " | ".join(f"sFID@{s}" for s in steps) + f" | precision@{steps[-1]} | "
              f"recall@{steps[-1]} |"
              + ("".join(f" recognisable@{s} |" for s in steps) if recognised else ""),
              "|---" * ((3 if recognised else 2) * len(steps) + 3) + "|"]
    for label in labels:
      row = report["fid_vs_steps"][label][sampler]
      lines.append(f"| {label} | " + " | ".join(_fmt(row[s]["fid"]) for s in steps) + " | "
                   + " | ".join(_fmt(row[s].get("sfid")) for s in steps) + " | "
                   + f"{_fmt(row[steps[-1]].get('precision'), 3)} | "
                   f"{_fmt(row[steps[-1]].get('recall'), 3)} |"
                   + ("".join(f" {_fmt(row[s]['recognisable']['confident_fraction'])} |"
                              for s in steps) if recognised else ""))
    lines.append("")
    if recognised:
      ref = report.get("classifier_reference", {})
      lines += [f"recognisable: the fraction of samples a small classifier of the data "
                f"assigns one class with probability ≥ {ref.get('threshold', 0.8)} "
                f"(real {ref.get('split', 'test')} images: "
                f"{_fmt(ref.get('confident_fraction'))}); class histograms in report.json.",
                ""]
  colour = report["colour_shift"]["tables"]
  csteps = _ints(e.colour_steps, "eval.colour_steps")
  first = colour[labels[0]]
  lines += [f"## Colour shift ({report['colour_shift']['sampler']}, "
            f"{next(iter(first['steps'].values()))['n']} samples per cell)", "",
            "‖channel mean − data mean‖₂ in [−1, 1] units (lower is better); data channel "
            f"means {[round(v, 3) for v in first['data']['mean']]}, stds "
            f"{[round(v, 3) for v in first['data']['std']]}.", "",
            "| weighting | " + " | ".join(f"{s} steps" for s in csteps) + " |",
            "|---" * (len(csteps) + 1) + "|"]
  for label in labels:
    lines.append(f"| {label} | " + " | ".join(
        _fmt(colour[label]["steps"][s]["mean_shift"], 3) for s in csteps) + " |")
  lines += ["", "Sample std / data std:", "",
            "| weighting | " + " | ".join(f"{s} steps" for s in csteps) + " |",
            "|---" * (len(csteps) + 1) + "|"]
  for label in labels:
    lines.append(f"| {label} | " + " | ".join(
        _fmt(colour[label]["steps"][s]["std_ratio"], 3) for s in csteps) + " |")
  x0 = report["x0_error"]
  lo, hi = x0[labels[0]]["t_lo"], x0[labels[0]]["t_hi"]
  lines += ["", f"## x0 estimation error per timestep bucket (held-out, "
            f"n={x0[labels[0]]['n']})", "",
            "| weighting | " + " | ".join(f"t {a}–{b}" for a, b in zip(lo, hi)) + " |",
            "|---" * (len(lo) + 1) + "|"]
  for label in labels:
    lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in x0[label]["x0_mse"]) + " |")
  training = report.get("training", {})
  if training:
    lines += ["", "## Training: gradient noise and loss by timestep (last quarter of the "
              "logged steps)", "",
              "| run | steps | grad-norm mean | grad-norm variance | loss t∈[0,T/4) | "
              "[T/4,T/2) | [T/2,3T/4) | [3T/4,T) |", "|---" * 8 + "|"]
    for label in labels:
      t = training.get(label, {})
      steps = f"{t['first_step']}–{t['last_step']}" if "first_step" in t else "–"
      lines.append(f"| {label} | {steps} | {_fmt(t.get('grad_norm_mean'), 3)} | "
                   f"{_fmt(t.get('grad_norm_var'), 4)} | "
                   + " | ".join(_fmt(t.get(f"loss_q{q}"), 4) for q in range(4)) + " |")
  lines += ["", "## Plots", ""]
  for name, file in report["files"].items():
    if not file.endswith(".png"):
      continue
    base = os.fspath(paths.path(path).parent) + "/"
    lines.append(f"![{name}]({file[len(base):] if file.startswith(base) else file})")
  return os.fspath(paths.write_text(path, "\n".join(lines) + "\n"))


def compare(config, workdir: str) -> dict:
  """--mode=compare: train each of config.compare.weightings, evaluate them together."""
  config = config_lib.with_eval_preset(config)
  validate_eval_config(config, compare_mode=True)
  config_lib.validate_config(config)
  names = _names(config.compare.weightings)
  for name in names:
    sub = _trained_run_config(config, name)
    _train_or_reuse(sub, _join(workdir, "runs", name), name)
  runs = [run_lib.open_run(_join(workdir, "runs", n), n, config.eval.ema_rate) for n in names]
  report = evaluate_runs(runs, config, _join(workdir, "compare"), workdir)
  report["training"] = {n: training_statistics(_join(workdir, "runs", n)) for n in names}
  report["files"]["report"] = _join(workdir, "report.md")
  if jax.process_index() == 0:
    write_report(report, config, report["files"]["report"])
    analysis.write_json(report, _join(workdir, "report.json"))
  return report
