"""The built-in analyses (see `registry`): each computes its pieces, plots and reports.

  weight_curve       a stateful weighting's effective weight against t
  x0_error           ‖x̂0 − x0‖² per timestep bucket on held-out images
  colour_shift       channel mean and std of few-step samples against the data
  fid_vs_steps       FID, sFID, precision/recall (and recognisability) per sampler and steps
  fid_vs_train_step  FID of every checkpoint at config.eval.train_curve_steps
  fid_vs_guidance    FID against classifier-free guidance scale (eval.guidance_scales)
  fid_vs_ema_length  FID against post-hoc EMA length σ_rel (eval.posthoc_ema)
  training           gradient noise and loss per quarter of t, from metrics.jsonl
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import checkpoints
from diffusion_jax import config_lib
from diffusion_jax import reporting
from diffusion_jax import run as run_lib
from diffusion_jax.evaluation import analysis
from diffusion_jax.evaluation import plots
from diffusion_jax.evaluation.registry import Analysis
from diffusion_jax.evaluation.registry import register

_ints, _names = config_lib.int_list, config_lib.name_list


def _fmt(value, digits=2):
  return "–" if value is None else f"{value:.{digits}f}"


def _int_keys(table: dict) -> dict:
  return {int(k): v for k, v in table.items()}


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


@register("weight_curve")
class WeightCurve(Analysis):

  def compute(self, ctx):
    return {r.label: c for r in ctx.runs if (c := weight_curve(r)) is not None}

  def plot(self, section, ctx):
    if not section:
      return {}
    path = ctx.out / "weight_curve.png"
    return {"weight_curve": plots.plot_weight_curves(section, ctx.runs[0].diffusion, path)}


@register("x0_error")
class X0Error(Analysis):

  def plan(self, ctx):
    return {f"x0/{r.label}": (ctx.e.x0_buckets * ctx.e.x0_num_examples, 0) for r in ctx.runs}

  def compute(self, ctx):
    e = ctx.e
    tqdm.write(f"x0 error per timestep on {e.x0_num_examples} held-out images ({e.x0_split})")
    held = {}

    def x0_error(r):
      if not held:
        images, labels = ctx.data_images(e.x0_num_examples, e.seed + 1, e.x0_split)
        held.update(images=images.astype(np.float32) / 127.5 - 1, labels=labels)
      return analysis.x0_error_by_timestep(
          r.model, r.diffusion, r.params, held["images"], ctx.key, e.x0_buckets,
          labels=held["labels"] if r.config.model.class_cond else None), None

    return {r.label: ctx.piece(f"x0/{r.label}", ctx.settings(
        r, n=e.x0_num_examples, split=e.x0_split, buckets=e.x0_buckets),
                               lambda r=r: x0_error(r))[0] for r in ctx.runs}

  def plot(self, section, ctx):
    return {"x0_error": plots.plot_x0_error(section, ctx.out / "x0_error.png")}

  def report(self, section, ctx):
    first = next(iter(section.values()))
    lo, hi = first["t_lo"], first["t_hi"]
    return ([f"## x0 estimation error per timestep bucket (held-out, n={first['n']})", "",
             "| run | " + " | ".join(f"t {a}–{b}" for a, b in zip(lo, hi)) + " |",
             "|---" * (len(lo) + 1) + "|"]
            + [f"| {label} | " + " | ".join(f"{v:.4f}" for v in r["x0_mse"]) + " |"
               for label, r in section.items()])


@register("colour_shift")
class ColourShift(Analysis):

  def __init__(self):
    self.strips = {}

  def plan(self, ctx):
    n = ctx.e.colour_num_samples * sum(_ints(ctx.e.colour_steps, "eval.colour_steps"))
    return {f"colour/{r.label}": (n, 0) for r in ctx.runs}

  def compute(self, ctx):
    e = ctx.e
    tqdm.write(f"Colour shift: {e.colour_num_samples} {e.colour_sampler} samples per step "
               "count")
    data, _ = ctx.data_images(max(e.num_reference, 2), e.seed)
    steps = _ints(e.colour_steps, "eval.colour_steps")

    def colour(r):
      samples = {s: ctx.sample(r, e.colour_sampler, s, e.colour_num_samples) for s in steps}
      return (analysis.colour_shift(samples, data),
              {str(s): images[:4] for s, images in samples.items()})

    tables = {}
    for r in ctx.runs:
      table, strip = ctx.piece(f"colour/{r.label}", ctx.settings(
          r, sampler=e.colour_sampler, steps=steps, n=e.colour_num_samples,
          batch_size=e.batch_size, data_n=max(e.num_reference, 2)), lambda r=r: colour(r))
      tables[r.label] = {**table, "steps": _int_keys(table["steps"])}
      self.strips[r.label] = _int_keys(strip)
    return {"sampler": e.colour_sampler, "tables": tables}

  def plot(self, section, ctx):
    return {"colour_strip": plots.plot_colour_strip(self.strips, ctx.out / "colour_strip.png"),
            "colour_stats": plots.plot_colour_stats(section["tables"],
                                                    ctx.out / "colour_stats.png")}

  def report(self, section, ctx):
    tables = section["tables"]
    steps = _ints(ctx.e.colour_steps, "eval.colour_steps")
    first = next(iter(tables.values()))
    header = ["| run | " + " | ".join(f"{s} steps" for s in steps) + " |",
              "|---" * (len(steps) + 1) + "|"]
    rows = lambda key: [f"| {label} | " + " | ".join(
        _fmt(t["steps"][s][key], 3) for s in steps) + " |" for label, t in tables.items()]
    return ([f"## Colour shift ({section['sampler']}, "
             f"{next(iter(first['steps'].values()))['n']} samples per cell)", "",
             "‖channel mean − data mean‖₂ in [−1, 1] units (lower is better); data channel "
             f"means {[round(v, 3) for v in first['data']['mean']]}, stds "
             f"{[round(v, 3) for v in first['data']['std']]}.", ""]
            + header + rows("mean_shift") + ["", "Sample std / data std:", ""]
            + header + rows("std_ratio"))


@register("fid_vs_steps")
class FidVsSteps(Analysis):

  def plan(self, ctx):
    e = ctx.e
    return {f"fid/{r.label}/{sampler}/{s}": (e.num_samples * s, e.num_samples)
            for r in ctx.runs for sampler in _names(e.samplers)
            for s in _ints(e.steps, "eval.steps")}

  def compute(self, ctx):
    e = ctx.e
    tqdm.write(f"FID against sampling steps: {e.num_samples} samples per point")
    fid = {}
    for r in ctx.runs:
      fid[r.label] = {}
      for sampler in _names(e.samplers):
        fid[r.label][sampler] = {}
        for s in _ints(e.steps, "eval.steps"):
          value, _ = ctx.piece(f"fid/{r.label}/{sampler}/{s}", ctx.settings(
              r, sampler=sampler, steps=s, **ctx.quality_settings),
                               lambda r=r, sampler=sampler, s=s: (ctx.quality(r, sampler, s),
                                                                  None))
          fid[r.label][sampler][s] = value
          tqdm.write(f"  {r.label} {sampler}-{s}: FID {value['fid']:.2f}"
                     + (f", recognisable {value['recognisable']['confident_fraction']:.2f}"
                        if "recognisable" in value else ""))
          ctx.publish(fid)
    return fid

  def plot(self, section, ctx):
    return {"fid_vs_steps": plots.plot_fid_vs_steps(section, ctx.out / "fid_vs_steps.png",
                                                    model=ctx.model_title)}

  def report(self, section, ctx):
    lines = []
    steps = _ints(ctx.e.steps, "eval.steps")
    for sampler in _names(ctx.e.samplers):
      rows = {label: by_sampler[sampler] for label, by_sampler in section.items()}
      recognised = "recognisable" in next(iter(rows.values()))[steps[-1]]
      lines += [f"## FID / sFID ({sampler})", "",
                "| run | " + " | ".join(f"FID@{s}" for s in steps) + " | "
                + " | ".join(f"sFID@{s}" for s in steps) + f" | precision@{steps[-1]} | "
                f"recall@{steps[-1]} |"
                + ("".join(f" recognisable@{s} |" for s in steps) if recognised else ""),
                "|---" * ((3 if recognised else 2) * len(steps) + 3) + "|"]
      for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row[s]["fid"]) for s in steps) + " | "
                     + " | ".join(_fmt(row[s].get("sfid")) for s in steps) + " | "
                     + f"{_fmt(row[steps[-1]].get('precision'), 3)} | "
                     f"{_fmt(row[steps[-1]].get('recall'), 3)} |"
                     + ("".join(f" {_fmt(row[s]['recognisable']['confident_fraction'])} |"
                                for s in steps) if recognised else ""))
      lines.append("")
      if recognised:
        ref = ctx.classifier.reference if ctx.classifier is not None else {}
        lines += [f"recognisable: the fraction of samples a small classifier of the data "
                  f"assigns one class with probability ≥ {ref.get('threshold', 0.8)} "
                  f"(real {ref.get('split', 'test')} images: "
                  f"{_fmt(ref.get('confident_fraction'))}); class histograms in the JSON.",
                  ""]
    return lines


@register("fid_vs_train_step")
class FidVsTrainStep(Analysis):
  """FID of every saved checkpoint, with the first of eval.samplers."""

  def plan(self, ctx):
    e = ctx.e
    return {f"curve/{r.label}/{step}": (e.num_samples * e.train_curve_steps, e.num_samples)
            for r in ctx.runs for step in checkpoints.checkpoint_steps(r.workdir)}

  def compute(self, ctx):
    e = ctx.e
    sampler = _names(e.samplers)[0]
    section = {"sampler": sampler, "steps": e.train_curve_steps, "curve": {}}
    for r in ctx.runs:
      section["curve"][r.label] = {}
      for step in checkpoints.checkpoint_steps(r.workdir):
        def curve_point(step=step, r=r):
          run_at = run_lib.open_run(r.workdir, r.label, e.ema_rate, step)
          return ctx.quality(run_at, sampler, e.train_curve_steps), None
        section["curve"][r.label][step], _ = ctx.piece(
            f"curve/{r.label}/{step}",
            {**ctx.settings(r, sampler=sampler, steps=e.train_curve_steps,
                            **ctx.quality_settings), "train_step": step}, curve_point)
        ctx.publish(section)
    return section

  def plot(self, section, ctx):
    return {"fid_vs_train_step": plots.plot_fid_vs_train_step(
        section["curve"], ctx.out / "fid_vs_train_step.png",
        f"{section['sampler']}-{section['steps']}")}


class _Sweep(Analysis):
  """FID against one setting (`field`, a config.eval list of numbers), with the first of
  eval.samplers at the last of eval.steps."""
  field, xlabel = "", ""

  def values(self, ctx) -> list[float]:
    return config_lib.float_list(ctx.e[self.field], f"eval.{self.field}")

  def _point(self, ctx):
    return _names(ctx.e.samplers)[0], _ints(ctx.e.steps, "eval.steps")[-1]

  def plan(self, ctx):
    e, (_, steps) = ctx.e, self._point(ctx)
    return {f"{self.name}/{r.label}/{v:g}": (e.num_samples * steps, e.num_samples)
            for r in ctx.runs for v in self.values(ctx)}

  def quality(self, ctx, r, value, sampler, steps) -> dict:
    """The quality metrics (ctx.quality) of run `r` at setting `value`."""
    raise NotImplementedError

  def compute(self, ctx):
    sampler, steps = self._point(ctx)
    tqdm.write(f"FID against {self.xlabel}: {ctx.e.num_samples} {sampler}-{steps} samples "
               "per point")
    section = {"sampler": sampler, "steps": steps, "values": {}}
    for r in ctx.runs:
      section["values"][r.label] = {}
      for v in self.values(ctx):
        value, _ = ctx.piece(
            f"{self.name}/{r.label}/{v:g}",
            {**ctx.settings(r, sampler=sampler, steps=steps, **ctx.quality_settings),
             self.field: v},
            lambda r=r, v=v: (self.quality(ctx, r, v, sampler, steps), None))
        section["values"][r.label][f"{v:g}"] = value
        tqdm.write(f"  {r.label} {self.field}={v:g}: FID {value['fid']:.2f}")
        ctx.publish(section)
    return section

  def plot(self, section, ctx):
    series = {label: {float(v): m for v, m in per_value.items()}
              for label, per_value in section["values"].items()}
    return {self.name: plots.plot_fid_against(
        series, ctx.out / f"{self.name}.png", self.xlabel,
        f"{ctx.model_title}: {section['sampler']}-{section['steps']}")}

  def report(self, section, ctx):
    values = [f"{v:g}" for v in self.values(ctx)]
    lines = [f"## FID against {self.xlabel} ({section['sampler']}-{section['steps']})", "",
             "| run | metric | " + " | ".join(values) + " |", "|---" * (len(values) + 2) + "|"]
    for label, row in section["values"].items():
      lines.append(f"| {label} | FID | " + " | ".join(_fmt(row[v]["fid"]) for v in values)
                   + " |")
      lines.append(f"| {label} | sFID | "
                   + " | ".join(_fmt(row[v].get("sfid")) for v in values) + " |")
      if "recognisable" in row[values[0]]:
        lines.append(f"| {label} | recognisable | " + " | ".join(
            _fmt(row[v]["recognisable"]["confident_fraction"]) for v in values) + " |")
    return lines + [""]


@register("fid_vs_guidance")
class FidVsGuidance(_Sweep):
  field, xlabel = "guidance_scales", "classifier-free guidance scale"

  def quality(self, ctx, r, value, sampler, steps):
    return ctx.quality(r, sampler, steps, guidance_scale=value)


@register("fid_vs_ema_length")
class FidVsEmaLength(_Sweep):
  field, xlabel = "posthoc_ema", "post-hoc EMA length σ_rel"

  def quality(self, ctx, r, value, sampler, steps):
    posthoc, summary = r.with_posthoc_ema(value)
    return {**ctx.quality(posthoc, sampler, steps), "posthoc_ema": summary}


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


@register("training")
class Training(Analysis):
  """Each run's gradient noise and loss per quarter of t (last quarter of its logs)."""

  def compute(self, ctx):
    return {r.label: training_statistics(r.workdir) for r in ctx.runs}

  def report(self, section, ctx):
    lines = ["## Training: gradient noise and loss by timestep (last quarter of the logged "
             "steps)", "",
             "| run | steps | grad-norm mean | grad-norm variance | loss t∈[0,T/4) | "
             "[T/4,T/2) | [T/2,3T/4) | [3T/4,T) |", "|---" * 8 + "|"]
    for label, t in section.items():
      steps = f"{t['first_step']}–{t['last_step']}" if "first_step" in t else "–"
      lines.append(f"| {label} | {steps} | {_fmt(t.get('grad_norm_mean'), 3)} | "
                   f"{_fmt(t.get('grad_norm_var'), 4)} | "
                   + " | ".join(_fmt(t.get(f"loss_q{q}"), 4) for q in range(4)) + " |")
    return lines
