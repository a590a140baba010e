"""--mode=evaluate: the analyses config.eval.analyses names, over one or more runs.

  evaluate_workdir(config, workdir)   a workdir's checkpoint, into WORKDIR/eval/
  evaluate_runs(runs, config, out)    any runs together (what --mode=compare calls)

Each analysis (see `registry` and `analyses`) computes pieces, plots and a report
section. Every finished piece is saved at once in OUT/points.json and reused by a rerun
with the same settings; evaluation.json is rewritten after each piece ("complete":
false until the end) and report.md at the end. Every FID figure carries its sample
count; the reference statistics come from config.eval.reference_npz or from
config.eval.num_reference training images (cached under the workdir).
"""
from __future__ import annotations

import dataclasses
import functools
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
from diffusion_jax import models
from diffusion_jax import noisy_classifier
from diffusion_jax import paths
from diffusion_jax import reporting
from diffusion_jax import run as run_lib
from diffusion_jax.data import sources
from diffusion_jax.evaluation import analyses  # noqa: F401  (registers the built-in analyses)
from diffusion_jax.evaluation import analysis
from diffusion_jax.evaluation import inception as inception_lib
from diffusion_jax.evaluation import metrics
from diffusion_jax.evaluation import registry
from diffusion_jax.sampling import samplers


def validate_eval_config(config) -> None:
  """Raises ValueError naming the first bad config.eval field."""
  config_lib.validate_eval_fields(config)
  e = config.eval
  if e.reference_npz and not paths.exists(e.reference_npz):
    raise ValueError(f"config.eval.reference_npz={e.reference_npz!r} does not exist.")
  names = config_lib.name_list(e.analyses)
  if not names:
    raise ValueError(f"config.eval.analyses is empty; name some of {registry.available()}.")
  for name in names:
    registry.get(name)


def data_images(data_config, num: int, seed: int, split: str | None = None):
  """(uint8 images (num, H, W, C), int32 labels): a fixed random subset of a split."""
  data_config = data_config.copy_and_resolve_references()
  if split is not None:
    data_config.split = split
  source = sources.get_source(data_config)
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


def sample_images(run: run_lib.Run, options: samplers.SamplerOptions, num: int,
                  batch_size: int, seed: int) -> np.ndarray:
  """`num` uint8 samples of `run` drawn as `options` says; the same seed gives every run
  the same starting noise."""
  m = run.config.model
  n_dev = jax.device_count()
  batch = max(n_dev, min(batch_size, num) // n_dev * n_dev)
  sample_config = ml_collections.ConfigDict(dict(
      dataclasses.asdict(options), num_samples=num, batch_size=batch, seed=seed,
      save_npz=False, save_individual=False))
  classifier = (noisy_classifier.load_params(run.config, run.workdir)[:2]
                if options.classifier_scale else None)
  return samplers.generate(run.model, run.diffusion, run.params, sample_config, "",
                           class_cond=m.class_cond, num_classes=m.num_classes,
                           image_shape=(m.image_size, m.image_size, m.in_channels),
                           write=False, classifier=classifier)["images"]


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


def _seconds_per_image(fn, images) -> float:
  """Seconds per image of fn(images), timed on a second call (after compiling)."""
  fn(images)
  t0 = time.time()
  fn(images)
  return (time.time() - t0) / len(images)


def _unit_costs(ctx, plan: dict) -> tuple[float, float]:
  """Measured seconds per network evaluation of one image, and per Inception image; 0
  for whichever the plan does not use."""
  run, e = ctx.runs[0], ctx.e
  m = run.config.model
  nfe = inc = 0.0
  if any(n for n, _ in plan.values()):
    n_dev = jax.device_count()
    batch = max(n_dev, min(e.batch_size, e.num_samples) // n_dev * n_dev)
    t = jax.numpy.zeros((batch,), jax.numpy.int32)
    forward = jax.jit(lambda p, x: models.bind(run.model, p, t if m.class_cond else None)(x, t))
    nfe = _seconds_per_image(lambda x: jax.block_until_ready(forward(run.params, x)),
                             jax.numpy.zeros((batch, m.image_size, m.image_size,
                                              m.in_channels)))
  if any(i for _, i in plan.values()):
    inc = _seconds_per_image(
        lambda x: ctx.inception.features_uint8(_to_rgb(x), progress=False),
        np.zeros((50, m.image_size, m.image_size, m.in_channels), np.uint8))
  return nfe, inc


class Context:
  """What analyses share: the runs, config.eval, the output folder, cached pieces, and
  sampling, Inception, reference statistics and the classifier, each loaded when first
  used (see registry)."""

  def __init__(self, runs, config, out_dir: str, cache_dir: str, points):
    from diffusion_jax.evaluation import recognisability  # pylint: disable=import-outside-toplevel
    self.runs, self.config, self.e = runs, config, config.eval
    self.out, self.cache_dir, self.points = paths.path(out_dir), cache_dir, points
    self.primary = jax.process_index() == 0
    self.key = jax.random.PRNGKey(self.e.seed)
    self.model_title = _model_title(runs)
    # Deterministic and clipped, with config.sample's solver settings.
    self.sampling = dataclasses.replace(samplers.SamplerOptions.from_config(config.sample),
                                        eta=0.0, clip_denoised=True)
    # Whether the caches exist is read by every process before process 0 writes any.
    self._classifier_cached = self.e.classifier and paths.exists(
        recognisability.cache_path(runs[0].config.data, cache_dir))
    self.reference_cached = bool(self.e.reference_npz) or paths.exists(
        _reference_cache_path(config, cache_dir))
    self.progress = None  # set by evaluate_runs before any compute
    self.publish = lambda section: None  # set by evaluate_runs for the running analysis

  @functools.cached_property
  def inception(self):
    return inception_lib.FIDInception.load(self.e.inception_path or None)

  @functools.cached_property
  def classifier(self):
    """The recognisability classifier (trained once, cached), or None when off."""
    from diffusion_jax.evaluation import recognisability  # pylint: disable=import-outside-toplevel
    if not self.e.classifier:
      return None
    return recognisability.classifier_for(
        self.runs[0].config.data, self.runs[0].config.model.num_classes, self.cache_dir,
        cached=self._classifier_cached, write=self.primary)

  @functools.cached_property
  def reference(self) -> dict:
    ref = reference_statistics(self.config, self.inception, self.cache_dir,
                               cached=self.reference_cached, write=self.primary)
    if "reference" in self.progress.plan:
      self.progress.done("reference")
    return ref

  @property
  def reference_info(self) -> dict:
    return {"source": self.reference["source"], "n": int(self.reference["n"])}

  @property
  def quality_settings(self) -> dict:
    """What every FID piece depends on besides the run and the sampler."""
    return dict(n=self.e.num_samples, batch_size=self.e.batch_size,
                reference=self.reference_info, classifier=self.e.classifier)

  def settings(self, r: run_lib.Run, **more) -> dict:
    """What a piece of run `r` depends on: reused only when all of it is equal."""
    return {"workdir": r.workdir, "train_step": r.train_step, "ema_rate": self.e.ema_rate,
            "seed": self.e.seed, "order": self.sampling.order,
            "skip_type": self.sampling.skip_type, "thresholding": self.sampling.thresholding,
            **({"guidance": [self.sampling.guidance_scale, self.sampling.guidance_t_min,
                             self.sampling.guidance_t_max]}
               if self.sampling.guidance_scale != 1 else {}),  # older pieces stay valid
            **({"classifier_scale": self.sampling.classifier_scale}
               if self.sampling.classifier_scale else {}),
            **({"churn": [self.sampling.s_churn, self.sampling.s_tmin, self.sampling.s_tmax,
                          self.sampling.s_noise]} if self.sampling.s_churn != 0 else {}),
            **more}

  def piece(self, name: str, settings: dict, compute):
    """(value, arrays) of piece `name`: reused when saved with equal settings, else
    compute() and saved at once."""
    found = self.points.get(name, settings)
    if found is not None:
      tqdm.write(f"  reusing {name} from {self.points.file}")
      self.progress.skip(name)
      return found
    value, arrays = compute()
    value = self.points.put(name, settings, value, arrays)
    self.progress.done(name)
    return value, arrays

  def data_images(self, num: int, seed: int, split: str | None = None):
    return data_images(self.runs[0].config.data, num, seed, split)

  def sample(self, r: run_lib.Run, sampler: str, steps: int, num: int,
             **options) -> np.ndarray:
    """`num` samples with config.sample's settings for `sampler` and `steps`, and any
    other SamplerOptions field in `options` (e.g. guidance_scale)."""
    return sample_images(r, dataclasses.replace(self.sampling.with_sampler(sampler, steps),
                                                **options),
                         num, self.e.batch_size, self.e.seed)

  def quality(self, r: run_lib.Run, sampler: str, steps: int, **options) -> dict:
    """FID, sFID, precision/recall, static fraction (and recognisability) of
    eval.num_samples samples (`options` as for `sample`)."""
    return _quality(self.sample(r, sampler, steps, self.e.num_samples, **options),
                    self.inception, self.reference, self.classifier)


def evaluate_runs(runs: list[run_lib.Run], config, out_dir: str, cache_dir: str,
                  report_path: str | None = None) -> dict:
  """config.eval.analyses over `runs`, in that order; writes PNG and evaluation.json into
  out_dir and report.md at `report_path` (default out_dir/report.md); returns the report
  (one section per analysis, "files", "runs", "reference" when FID was computed).
  cache_dir holds the reference statistics and the classifier.

  In a multi-host job every process runs this with the same arguments: each samples
  and computes Inception features for its devices' share of every batch, and process 0
  alone writes files. All processes read the saved pieces and caches before any writes.
  """
  config = config_lib.with_eval_preset(config)
  chosen = [registry.get(name) for name in config_lib.name_list(config.eval.analyses)]
  primary = jax.process_index() == 0
  out = paths.path(out_dir)
  ctx = Context(runs, config, out_dir, cache_dir, _Points(out_dir, write=primary))
  distributed.barrier("evaluation: saved pieces and caches read")
  if primary:
    paths.makedirs(out_dir)
  plan = {}
  for a in chosen:
    plan.update(a.plan(ctx))
  if any(i for _, i in plan.values()) and not ctx.reference_cached:
    plan["reference"] = (0, config.eval.num_reference)
  with reporting.Spinner("timing the network and Inception for the estimate (compiles both)",
                         enabled=primary and bool(plan)):
    unit_costs = _unit_costs(ctx, plan)
  ctx.progress = _Progress(plan, *unit_costs)
  report = {"complete": False,
            "runs": {r.label: {"workdir": r.workdir, "train_step": r.train_step} for r in runs},
            "analyses": [a.name for a in chosen], "files": {}}

  def publish(a, section):
    report[a.name] = section
    if "reference" in ctx.__dict__:
      report["reference"] = ctx.reference_info
    if ctx.__dict__.get("classifier") is not None:
      report["classifier_reference"] = ctx.classifier.reference
    if primary:
      report["files"].update(a.plot(section, ctx))
      analysis.write_json(report, out / "evaluation.json")

  for a in chosen:
    ctx.publish = lambda section, a=a: publish(a, section)
    publish(a, a.compute(ctx))
  report["complete"] = True
  report["reused_pieces"] = ctx.points.reused
  report["files"]["evaluation"] = os.fspath(out / "evaluation.json")
  report["files"]["report"] = report_path or os.fspath(out / "report.md")
  if primary:
    analysis.write_json(report, out / "evaluation.json")
    write_markdown(report, config, chosen, ctx, report["files"]["report"])
  return report


def write_markdown(report: dict, config, chosen, ctx, path) -> str:
  """report.md: a header saying what was compared, each analysis's section in order, and
  the plots."""
  e = config.eval
  lines = [f"# Evaluation: {ctx.model_title}", "",
           f"Runs {', '.join(report['runs'])}; EMA params (rate {e.ema_rate}; -1: the first)."]
  if "reference" in report:
    lines[-1] += (f" FID against {report['reference']['source']} "
                  f"(n={report['reference']['n']}); {e.num_samples} samples per FID point.")
  lines.append("")
  for a in chosen:
    section = a.report(report[a.name], ctx) if report.get(a.name) else []
    lines += section + ([""] if section else [])
  lines += ["## Plots", ""]
  base = os.fspath(paths.path(path).parent) + "/"
  for name, file in report["files"].items():
    if file.endswith(".png"):
      lines.append(f"![{name}]({file[len(base):] if file.startswith(base) else file})")
  return os.fspath(paths.write_text(path, "\n".join(lines) + "\n"))


def _model_title(runs: list[run_lib.Run]) -> str:
  """What the runs' plots are of, e.g. "adm_unet on fashion_mnist 32 px, step 2400"."""
  return "; ".join(sorted({
      f"{r.config.model.name} on {r.config.data.dataset} {r.config.model.image_size} px, "
      f"step {r.train_step}" for r in runs}))


def _join(base, *parts) -> str:
  return os.fspath(paths.path(base).joinpath(*parts))


def evaluate_workdir(config, workdir: str) -> dict:
  """--mode=evaluate: the latest checkpoint of `workdir` (every checkpoint for
  fid_vs_train_step); writes WORKDIR/eval/evaluation.json, report.md and the plots."""
  config = config_lib.with_eval_preset(config)
  validate_eval_config(config)
  saved = checkpoints.saved_config_matching(workdir, config)
  run = run_lib.open_run(workdir, saved.diffusion.weighting, config.eval.ema_rate)
  return evaluate_runs([run], config, _join(workdir, "eval"), workdir)
