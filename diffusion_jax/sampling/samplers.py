"""Samplers: DDPM, DDIM, DPM-Solver++, UniPC, and EDM's Euler and Heun, each one
compiled loop.

DDPM and DDIM respace the diffusion (guided-diffusion semantics); the solvers
(`solvers.py`) and EDM's samplers (`edm.py`) call the network at fractional timesteps.

`model_fn(x, t)` receives t on the training scale [0, T) (integers here), and returns
the network output (C or 2C channels); class labels and guidance are closed over by
the caller. Every sampler is pure and deterministic given its key; noise is drawn per
step from `fold_in(key, step)`, so results do not depend on the device count.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.core.diffusion import GaussianDiffusion
from diffusion_jax.sampling import edm
from diffusion_jax.sampling import solvers

SAMPLERS = ("ddpm", "ddim") + solvers.SOLVERS + edm.EDM_SAMPLERS


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """How a sample is drawn: the one list of sampler options. config.sample holds these
  fields (with how many samples and where), `sample()` takes them as keyword arguments
  (`kwargs()`), and evaluation's reuse keys are made of them.

  sampler: one of SAMPLERS. steps: network evaluations, except for "euler" and "heun",
  where it is EDM's number of noise levels N (Heun evaluates the network 2N − 1 times).
  eta: DDIM's noise scale (0: deterministic). clip_denoised: clip x̂0 to [−1, 1] at every
  step. thresholding: dynamic thresholding of x̂0 instead of clipping. order and
  skip_type: the solvers' order (UniPC 1–3, DPM-Solver++ 2) and time grid ("logSNR" or
  "time_uniform"); ddpm and ddim leave them at their defaults. guidance_scale:
  classifier-free guidance w (1: off; 0: the unconditional model), for class-conditional
  models trained with label dropout to a null class (see `guided`), applied only while
  t/T lies in [guidance_t_min, guidance_t_max] (the guidance interval of Kynkäänniemi et
  al. 2024; outside it the conditional model alone). classifier_scale: classifier
  guidance's s (0: off) with the run's noisy classifier (--mode=train_classifier). s_churn, s_tmin, s_tmax, s_noise:
  EDM's stochasticity for "euler" and "heun" (S_churn = 0: the deterministic ODE solver;
  see edm.py).
  """
  sampler: str = "ddim"
  steps: int = 50
  eta: float = 0.0
  clip_denoised: bool = True
  thresholding: bool = False
  order: int = 2
  skip_type: str = "logSNR"
  guidance_scale: float = 1.0
  guidance_t_min: float = 0.0
  guidance_t_max: float = 1.0
  classifier_scale: float = 0.0
  s_churn: float = 0.0
  s_tmin: float = 0.0
  s_tmax: float = float("inf")
  s_noise: float = 1.0

  @classmethod
  def from_config(cls, sample_config) -> "SamplerOptions":
    """The options in `sample_config` (config.sample, or any mapping with its fields)."""
    return cls(**{f.name: sample_config[f.name] for f in dataclasses.fields(cls)})

  def with_sampler(self, sampler: str, steps: int) -> "SamplerOptions":
    """These settings for another sampler and step count (evaluation's sweeps); the
    fields that do not apply to `sampler` go back to their defaults."""
    return dataclasses.replace(
        self, sampler=sampler, steps=steps,
        **{name: getattr(SamplerOptions, name)
           for name, applies_to in _SPECIFIC_FIELDS.items() if sampler not in applies_to})

  def check(self, field: str = "sample") -> "SamplerOptions":
    """self, or a ValueError naming config.`field`.X and the fix."""
    if self.sampler not in SAMPLERS:
      raise ValueError(f"config.{field}.sampler={self.sampler!r}: choose one of "
                       f"{list(SAMPLERS)}.")
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"config.{field}.steps={self.steps!r}: must be a positive integer.")
    if not (math.isfinite(self.eta) and self.eta >= 0):
      raise ValueError(f"config.{field}.eta={self.eta!r}: must be ≥ 0.")
    for name in ("clip_denoised", "thresholding"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"config.{field}.{name}={getattr(self, name)!r}: must be True or "
                         "False.")
    if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)
            and self.guidance_scale >= 0):
      raise ValueError(f"config.{field}.guidance_scale={self.guidance_scale!r}: must be a "
                       "finite number ≥ 0 (1: no guidance).")
    if not (isinstance(self.classifier_scale, (int, float))
            and math.isfinite(self.classifier_scale) and self.classifier_scale >= 0):
      raise ValueError(f"config.{field}.classifier_scale={self.classifier_scale!r}: must be "
                       "a finite number ≥ 0 (0: no classifier guidance).")
    lo, hi = self.guidance_t_min, self.guidance_t_max
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))
            and 0 <= lo < hi <= 1):
      raise ValueError(f"config.{field}.guidance_t_min={lo!r}, guidance_t_max={hi!r}: "
                       "need 0 ≤ guidance_t_min < guidance_t_max ≤ 1 (fractions of T).")
    if self.skip_type not in solvers.SKIP_TYPES:
      raise ValueError(f"config.{field}.skip_type={self.skip_type!r}: choose one of "
                       f"{list(solvers.SKIP_TYPES)}.")
    if self.sampler == "unipc" and self.order not in (1, 2, 3):
      raise ValueError(f"config.{field}.order={self.order!r}: UniPC takes order 1, 2 or 3.")
    if self.sampler == "dpm_solver++" and self.order != 2:
      raise ValueError(f"config.{field}.order={self.order!r}: DPM-Solver++ here is the "
                       "second-order multistep solver (2M); set order=2, or use "
                       "sampler=unipc for orders 1–3.")
    for name in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and value >= 0 and not math.isnan(value)):
        raise ValueError(f"config.{field}.{name}={value!r}: must be a number ≥ 0.")
    if self.s_tmin > self.s_tmax:
      raise ValueError(f"config.{field}.s_tmin={self.s_tmin!r} > s_tmax={self.s_tmax!r}: "
                       "churn applies to noise levels in [s_tmin, s_tmax].")
    for name, applies_to in _SPECIFIC_FIELDS.items():
      default = getattr(SamplerOptions, name)
      if self.sampler not in applies_to and getattr(self, name) != default:
        raise ValueError(f"config.{field}.{name}={getattr(self, name)!r}: applies to "
                         f"{list(applies_to)}, not to sampler={self.sampler!r}; leave it "
                         f"at {default!r}.")
    return self

  def kwargs(self) -> dict:
    """`sample()`'s keyword arguments (classifier-free guidance is applied to its
    model_fn, `guided`; classifier guidance is its `guidance` argument)."""
    kw = dict(sampler=self.sampler, steps=self.steps, clip_denoised=self.clip_denoised,
              eta=self.eta, thresholding=self.thresholding)
    kw.update({name: getattr(self, name) for name, applies_to in _SPECIFIC_FIELDS.items()
               if self.sampler in applies_to})
    return kw


# The options that only some samplers take (check() refuses them elsewhere).
_SPECIFIC_FIELDS = {"order": solvers.SOLVERS, "skip_type": solvers.SOLVERS,
                    **{name: edm.EDM_SAMPLERS
                       for name in ("s_churn", "s_tmin", "s_tmax", "s_noise")}}


def guided(model_fn, labels, null_label: int, scale: float, channels: int,
           interval: tuple[float, float] | None = None):
  """Classifier-free guidance (Ho & Salimans 2022): model_fn(x, t, labels) -> output,
  evaluated once on the conditional and null-labelled halves of a doubled batch, becomes
  (x, t) -> u + scale·(c − u) on the first `channels` output channels (the model's own
  target: ε, x0 or v), with the remaining (learned-variance) channels taken from the
  conditional half unguided, as DiT does. labels: int32 (B,). interval: (t_lo, t_hi) on
  the training scale; outside it (per example) the output is the conditional one.
  """
  def fn(x, t):
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = jnp.split(out, 2)
    mix = uncond[..., :channels] + scale * (cond[..., :channels] - uncond[..., :channels])
    if interval is not None:
      inside = (t >= interval[0]) & (t <= interval[1])
      mix = jnp.where(inside.reshape((-1,) + (1,) * (x.ndim - 1)), mix, cond[..., :channels])
    return jnp.concatenate([mix, cond[..., channels:]], axis=-1)
  return fn


class ClassifierGuidance(NamedTuple):
  """Classifier guidance (Dhariwal & Nichol 2021): log_prob_fn(x, t) -> (B, classes)
  log-probabilities of a noisy classifier at x_t and t on the training scale; labels:
  int32 (B,) the classes to guide towards; scale: s (guided-diffusion's classifier_scale)."""
  log_prob_fn: Callable
  labels: jax.Array
  scale: float

  def gradient(self, x, t):
    """s·∇_x log p(y | x, t), x's shape and dtype."""
    def log_p(x):
      lp = self.log_prob_fn(x, t)
      return jnp.sum(jnp.take_along_axis(lp, self.labels[:, None].astype(jnp.int32), axis=1))
    return self.scale * jax.grad(log_p)(x)


def classifier_guided(model_fn, diffusion: GaussianDiffusion, guidance: ClassifierGuidance,
                      channels: int):
  """model_fn with classifier guidance as guided-diffusion's condition_score: ε̂ becomes
  ε̂ − √(1 − ᾱ_t)·s·∇ log p(y | x_t), applied to the model's own target (x0 gains
  (1 − ᾱ)/√ᾱ·s∇, v loses √(1 − ᾱ)/√ᾱ·s∇) in its first `channels` output channels.
  `diffusion` is the training one; ᾱ at fractional t interpolates log √ᾱ (solvers.py).
  Used by every sampler but DDPM, which shifts its mean instead (`p_sample`)."""
  log_alpha = jnp.asarray(solvers.log_alpha_table(diffusion), jnp.float32)
  per_target = {"eps": lambda a, g: -jnp.sqrt(1 - a) * g,
                "x0": lambda a, g: (1 - a) / jnp.sqrt(a) * g,
                "v": lambda a, g: -jnp.sqrt((1 - a) / a) * g}[diffusion.target]

  def fn(x, t):
    out = model_fn(x, t)
    abar = jnp.exp(2 * solvers.interp(log_alpha, t.astype(jnp.float32)))
    shift = per_target(abar.reshape((-1,) + (1,) * (x.ndim - 1)), guidance.gradient(x, t))
    return jnp.concatenate([out[..., :channels] + shift.astype(out.dtype),
                            out[..., channels:]], axis=-1)
  return fn


def respacing_for(sampler: str, steps: int, num_timesteps: int) -> str:
  """guided-diffusion's respacing: evenly strided "ddimN" for DDIM when it exists."""
  if sampler == "ddim" and any(len(range(0, num_timesteps, stride)) == steps
                               for stride in range(1, num_timesteps)):
    return f"ddim{steps}"
  return str(steps)


def p_sample(diffusion: GaussianDiffusion, model_fn, x, t, key, clip_denoised=True,
             denoised_fn=None, guidance: ClassifierGuidance | None = None):
  """One ancestral step x_t -> x_{t−1} (guided-diffusion's p_sample); with `guidance`,
  the mean moves by Σ·s∇ log p(y | x_t) (its condition_mean)."""
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn)
  mean = out["mean"]
  if guidance is not None:
    mean = mean + jnp.exp(out["log_variance"]) * guidance.gradient(
        x, diffusion.model_timesteps(t))
  noise = jax.random.normal(key, x.shape, x.dtype)
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return {"sample": mean + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise,
          "pred_xstart": out["pred_xstart"]}


def ddim_sample(diffusion: GaussianDiffusion, model_fn, x, t, key, clip_denoised=True,
                denoised_fn=None, eta: float = 0.0):
  """One DDIM step (Song et al. eq. 12; guided-diffusion's ddim_sample)."""
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn)
  eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
  abar = diffusion._at("alphas_cumprod", t, x)  # pylint: disable=protected-access
  abar_prev = diffusion._at("alphas_cumprod_prev", t, x)  # pylint: disable=protected-access
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
  mean = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
  noise = jax.random.normal(key, x.shape, x.dtype)
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}


def sample(diffusion: GaussianDiffusion, model_fn, shape, key, sampler: str = "ddim",
           steps: int = 50, clip_denoised: bool = True, eta: float = 0.0, noise=None,
           thresholding: bool = False, guidance: ClassifierGuidance | None = None,
           **solver_kw):
  """Samples of `shape` (NHWC), float32, from noise drawn with `key` (or `noise`).

  Args:
    diffusion: the training diffusion (T steps); respaced or interpolated here.
    model_fn: (x, t) -> network output, t on the training scale.
    sampler: one of SAMPLERS.
    steps: network evaluations (for "euler" and "heun": EDM's noise levels N).
    clip_denoised: clip x̂0 to [−1, 1] at every step.
    eta: DDIM's noise scale (0: deterministic).
    thresholding: dynamic thresholding of x̂0 instead of clipping.
    guidance: classifier guidance (guided-diffusion's: DDPM shifts its mean, the others
      correct ε̂; see `classifier_guided`).
    **solver_kw: `order`, `skip_type`, `lower_order_final` for the solvers;
      `s_churn`, `s_tmin`, `s_tmax`, `s_noise` for EDM's samplers.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}.")
  if not 1 <= steps <= diffusion.num_timesteps:
    raise ValueError(f"steps={steps} must be in [1, {diffusion.num_timesteps}].")
  init_key, loop_key = jax.random.split(key)
  x = jax.random.normal(init_key, shape, jnp.float32) if noise is None else noise
  if guidance is not None and sampler != "ddpm":
    model_fn = classifier_guided(model_fn, diffusion, guidance, shape[-1])
  if sampler in solvers.SOLVERS:
    return solvers.solve(diffusion, model_fn, x, sampler, steps, clip_denoised=clip_denoised,
                         thresholding=thresholding, **solver_kw)
  if sampler in edm.EDM_SAMPLERS:
    return edm.solve(diffusion, model_fn, x, sampler, steps, loop_key,
                     clip_denoised=clip_denoised, thresholding=thresholding, **solver_kw)
  if solver_kw:
    raise ValueError(f"{sorted(solver_kw)} apply to the solvers, not to {sampler}.")
  spaced = diffusion.respace(respacing_for(sampler, steps, diffusion.num_timesteps))
  denoised_fn = solvers.dynamic_threshold if thresholding else None
  clip = clip_denoised and not thresholding
  n = spaced.num_timesteps

  def body(i, x):
    t = jnp.full((shape[0],), n - 1 - i, jnp.int32)
    k = jax.random.fold_in(loop_key, i)
    if sampler == "ddpm":
      return p_sample(spaced, model_fn, x, t, k, clip, denoised_fn, guidance)["sample"]
    return ddim_sample(spaced, model_fn, x, t, k, clip, denoised_fn, eta=eta)["sample"]

  return jax.lax.fori_loop(0, n, body, x)


def generate(model, diffusion, params, sample_config, out_dir: str, *, class_cond: bool,
             num_classes: int, image_shape, mesh=None, write: bool = True,
             resume_key: str | None = None, classifier=None) -> dict:
  """Generates sample_config.num_samples images in batches, sharded over `mesh` (default:
  every device of every process, so each host of a multi-host job computes its share of
  each batch; every process returns all the images, and only those given write=True
  write files).

  The batch b draws its noise from fold_in(PRNGKey(seed), b), so the samples do not
  depend on the device count. Writes into `out_dir`: samples_grid.png (the first 64),
  samples.npz (arr_0 uint8 NHWC and, when class-conditional, arr_1 labels: the
  format of guided-diffusion's evaluator), and PNGs under images/ when
  sample_config.save_individual. Returns {"images": uint8 array, "labels": array|None}.

  With `resume_key` (a string naming the params and settings, e.g. the checkpoint step
  and sample config), each finished batch is kept in out_dir/partial_<hash of the key>/
  as it finishes, and a rerun with the same key computes only the missing batches
  (the same images: batch b's noise depends only on b). The folder is removed once the
  outputs are written.

  classifier: (model, params) of a noisy classifier, required when
  sample_config.classifier_scale > 0 (classifier guidance towards each batch's labels,
  which are then saved as for a class-conditional model).
  """
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  from diffusion_jax import distributed  # pylint: disable=import-outside-toplevel
  from diffusion_jax import paths  # pylint: disable=import-outside-toplevel
  from diffusion_jax import reporting  # pylint: disable=import-outside-toplevel

  options = SamplerOptions.from_config(sample_config).check()
  if options.guidance_scale != 1 and not (class_cond and
                                          getattr(model, "class_dropout_prob", 0) > 0):
    raise ValueError(f"sample.guidance_scale={options.guidance_scale} needs a "
                     "class-conditional model trained with label dropout to a null class "
                     "(model.class_dropout_prob > 0); set guidance_scale=1.")
  if options.classifier_scale and classifier is None:
    raise ValueError(f"sample.classifier_scale={options.classifier_scale} needs a noisy "
                     "classifier (--mode=train_classifier); set classifier_scale=0.")
  guided_by_classifier = bool(options.classifier_scale)
  mesh = mesh or Mesh(np.array(jax.devices()), ("data",))
  bsz, total = sample_config.batch_size, sample_config.num_samples
  if bsz % mesh.size:
    raise ValueError(f"sample.batch_size={bsz} does not divide across {mesh.size} devices.")
  out_sharding = NamedSharding(mesh, P(mesh.axis_names))
  replicated = NamedSharding(mesh, P())

  # Computed sharded over the batch, returned replicated so every host can read it.
  @functools.partial(jax.jit, out_shardings=replicated)
  def run(p, key, labels, classifier_params):
    from diffusion_jax import models  # pylint: disable=import-outside-toplevel
    guidance = None
    if guided_by_classifier:
      log_prob = lambda x, t: jax.nn.log_softmax(
          classifier[0].apply({"params": classifier_params}, x, t))
      guidance = ClassifierGuidance(log_prob, labels, options.classifier_scale)
    if options.guidance_scale != 1:
      n = diffusion.num_timesteps
      fn = guided(lambda x, t, y: models.bind(model, p, y)(x, t), labels, num_classes,
                  options.guidance_scale, image_shape[-1],
                  (options.guidance_t_min * n, options.guidance_t_max * n))
    else:
      fn = models.bind(model, p, labels if class_cond else None)
    x = sample(diffusion, fn, (bsz,) + tuple(image_shape), key, guidance=guidance,
               **options.kwargs())
    x = jax.lax.with_sharding_constraint(x, out_sharding)
    return jnp.clip(jnp.round((x + 1) * 127.5), 0, 255).astype(jnp.uint8)

  # Arrays that are already global (a multi-host train state) are used as they are.
  to_global = lambda tree: jax.tree_util.tree_map(
      lambda x: x if isinstance(x, jax.Array) and not x.is_fully_addressable
      else distributed.host_to_global(x, replicated), tree)
  params = to_global(params)
  classifier_params = to_global(classifier[1]) if guided_by_classifier else None
  base = jax.random.PRNGKey(sample_config.seed)
  partial = None
  if resume_key is not None:
    digest = hashlib.sha256(resume_key.encode()).hexdigest()[:16]
    partial = paths.path(out_dir) / f"partial_{digest}"
  done = _finished_batches(partial)
  num_batches = -(-total // bsz)
  if done and jax.process_index() == 0:
    print(f"Resuming: {len(done)} of {num_batches} batches already in {partial}.", flush=True)
  labels_of = lambda b: (np.arange(b * bsz, (b + 1) * bsz) % num_classes).astype(np.int32)
  key_of = lambda b: np.asarray(jax.random.fold_in(base, b))
  if len(done) < num_batches:  # compiled before the bar starts, so the bar moves at once
    with reporting.Spinner(f"compiling the {sample_config.sampler} sampler "
                           f"({sample_config.steps} steps)",
                           enabled=jax.process_index() == 0):
      run = run.lower(params, jax.ShapeDtypeStruct(base.shape, base.dtype),
                      jax.ShapeDtypeStruct((bsz,), np.int32), classifier_params).compile()
  images, labels = [], []
  for b in tqdm(range(num_batches), desc=f"sample ({sample_config.sampler})", unit="batch",
                disable=jax.process_index() != 0):
    y = labels_of(b)
    if b in done:
      batch = paths.load_npz(done[b])["images"]
    else:
      batch = np.asarray(run(params, key_of(b), y, classifier_params))
      if partial is not None and write:
        paths.save_npz(partial / f"batch_{b:06d}.npz", images=batch)
    images.append(batch)
    labels.append(y)
  images = np.concatenate(images)[:total]
  labels = np.concatenate(labels)[:total] if class_cond or guided_by_classifier else None
  if write:
    out = paths.makedirs(out_dir)
    reporting.save_png(reporting.image_grid(images[:64]), out / "samples_grid.png",
                       scale=max(1, 256 // images.shape[1]))
    if sample_config.save_npz:
      arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
      paths.save_npz(out / "samples.npz", **arrays)
    if sample_config.save_individual:
      for i, img in enumerate(tqdm(images, desc="write PNGs", unit="img")):
        reporting.save_png(img, out / "images" / f"{i:06d}.png")
    if partial is not None and partial.exists():
      partial.rmtree()
  return {"images": images, "labels": labels}


def _finished_batches(partial) -> dict:
  """{batch index: file} of the batches kept in `partial` (none when it is None)."""
  from diffusion_jax import paths  # pylint: disable=import-outside-toplevel
  if partial is None or not paths.isdir(partial):
    return {}
  found = {}
  for f in partial.iterdir():
    name = f.name
    if name.startswith("batch_") and name.endswith(".npz") and name[6:-4].isdigit():
      found[int(name[6:-4])] = f
  return found
