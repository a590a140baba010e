"""--mode=evaluate / --mode=compare and the analyses on tiny models."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from diffusion_jax import checkpoints
from diffusion_jax import run as run_lib
from diffusion_jax.core import diffusion as diffusion_lib
from diffusion_jax.evaluation import analyses
from diffusion_jax.evaluation import analysis
from diffusion_jax.evaluation import compare
from diffusion_jax.evaluation import evaluate
from diffusion_jax.evaluation import plots
from diffusion_jax.evaluation import registry
from diffusion_jax.sampling import samplers
from diffusion_jax.training import train
from tests import tiny_config


def _tiny_eval_config(weightings="constant,debias"):
  c = tiny_config.get_config()
  c.eval.update(num_samples=8, num_reference=16, colour_num_samples=4, x0_num_examples=8,
                x0_buckets=4, steps="2,3", colour_steps="2,3", batch_size=4, samplers="ddim",
                analyses="weight_curve,x0_error,colour_shift,fid_vs_steps,training,"
                         "fid_vs_train_step", train_curve_steps=2)
  c.compare.weightings = weightings
  return c


def _is_png(path):
  with Image.open(path) as img:
    return img.format == "PNG" and min(img.size) > 100


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("compare"))
  config = _tiny_eval_config()
  return workdir, config, compare.compare(config, workdir)


@pytest.mark.slow  # trains two tiny runs and samples them (~3 min)
def test_compare_writes_report_tables_and_plots(compared):
  workdir, config, report = compared
  assert set(report["runs"]) == {"constant", "debias"}
  for name in ("constant", "debias"):
    assert checkpoints.checkpoint_steps(os.path.join(workdir, "runs", name)) == [3, 6]
    saved = checkpoints.saved_config(os.path.join(workdir, "runs", name))
    assert saved.diffusion.weighting == name
    for steps in (2, 3):
      point = report["fid_vs_steps"][name]["ddim"][steps]
      assert point["n_samples"] == 8 and point["n_reference"] == 16
      assert np.isfinite(point["fid"]) and np.isfinite(point["sfid"])
      assert 0 <= point["precision"] <= 1
    assert set(report["fid_vs_train_step"]["curve"][name]) == {3, 6}
    assert set(report["colour_shift"]["tables"][name]["steps"]) == {2, 3}
    assert len(report["x0_error"][name]["x0_mse"]) == 4
  for key in ("x0_error", "colour_strip", "colour_stats", "fid_vs_steps", "fid_vs_train_step"):
    assert _is_png(report["files"][key]), key
  md = open(os.path.join(workdir, "report.md")).read()
  for text in ("| constant |", "| debias |", "FID@2", "sFID@3", "Colour shift", "x0 estimation",
               "8 samples per FID point", "(n=16)"):
    assert text in md, text
  with open(os.path.join(workdir, "report.json")) as f:
    assert json.load(f)["runs"]["debias"]["train_step"] == 6


@pytest.mark.slow  # trains two tiny runs and samples them (~3 min)
def test_compare_reuses_finished_runs(compared):
  workdir, config, _ = compared
  metrics_file = os.path.join(workdir, "runs", "debias", "metrics.jsonl")
  before = open(metrics_file).read()
  config.eval.update(analyses="x0_error,colour_shift,fid_vs_steps", steps="2")
  report = compare.compare(config, workdir)
  assert open(metrics_file).read() == before  # not retrained
  assert set(report["fid_vs_steps"]["debias"]["ddim"]) == {2}


@pytest.mark.slow  # trains two tiny runs and samples them (~3 min)
def test_evaluate_workdir(compared):
  workdir, config, _ = compared
  run_dir = os.path.join(workdir, "runs", "debias")
  config.eval.update(analyses="x0_error,colour_shift,fid_vs_steps", steps="3")
  report = evaluate.evaluate_workdir(config, run_dir)
  assert list(report["runs"]) == ["debias"]
  assert os.path.exists(os.path.join(run_dir, "eval", "evaluation.json"))
  assert _is_png(os.path.join(run_dir, "eval", "colour_strip.png"))


@pytest.mark.slow  # trains two tiny runs and samples them (~3 min)
def test_an_interrupted_evaluation_keeps_its_points_and_a_rerun_reuses_them(
    compared, tmp_path, monkeypatch, capsys):
  workdir, config, _ = compared
  config = config.copy_and_resolve_references()
  config.eval.update(analyses="x0_error,colour_shift,fid_vs_steps", steps="2,3")
  run = run_lib.open_run(os.path.join(workdir, "runs", "debias"), "debias")
  out = str(tmp_path / "eval")
  quality = evaluate._quality  # pylint: disable=protected-access
  calls = []

  def interrupt_second_point(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return quality(*args, **kwargs)

  monkeypatch.setattr(evaluate, "_quality", interrupt_second_point)
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate_runs([run], config, out, workdir)
  printed = capsys.readouterr()
  assert "network evaluations" in printed.out + printed.err  # the plan, with its ETA
  with open(os.path.join(out, "evaluation.json")) as f:
    partial = json.load(f)
  assert partial["complete"] is False and list(partial["fid_vs_steps"]["debias"]["ddim"]) == ["2"]
  assert _is_png(os.path.join(out, "fid_vs_steps.png"))
  first_fid = partial["fid_vs_steps"]["debias"]["ddim"]["2"]["fid"]

  calls.clear()
  monkeypatch.setattr(evaluate, "_quality", lambda *a, **k: calls.append(1) or quality(*a, **k))
  report = evaluate.evaluate_runs([run], config, out, workdir)
  assert len(calls) == 1  # only the point that was not finished
  assert report["complete"] is True
  assert set(report["reused_pieces"]) == {"x0/debias", "colour/debias", "fid/debias/ddim/2"}
  assert report["fid_vs_steps"]["debias"]["ddim"][2]["fid"] == first_fid
  # Other settings are not taken for the saved ones.
  config.eval.num_samples = 12
  assert evaluate.evaluate_runs([run], config, out, workdir)["reused_pieces"] == [
      "x0/debias", "colour/debias"]


def test_compare_refuses_a_run_with_another_weighting(tmp_path):
  config = _tiny_eval_config()
  wrong = config.copy_and_resolve_references()
  wrong.diffusion.weighting = "constant"
  run_dir = str(tmp_path / "runs" / "debias")
  wrong.train.num_steps = 3
  train.train_and_sample(wrong, run_dir)
  before = checkpoints.checkpoint_steps(run_dir)
  config.compare.weightings = "debias,constant"
  with pytest.raises(checkpoints.CheckpointConfigError, match="weighting"):
    compare.compare(config, str(tmp_path))
  assert checkpoints.checkpoint_steps(run_dir) == before


@pytest.mark.parametrize("field,value,match", [
    ("eval.samplers", "ddim,lms", "'lms': choose from"),
    ("eval.steps", "10,x", "comma-separated positive integers"),
    ("eval.colour_steps", "0,2", "comma-separated positive integers"),
    ("eval.num_samples", 2, "must exceed 3"),
    ("compare.weightings", "debias", "two or more"),
    ("compare.weightings", "debias,p3", r"two or more distinct runs.*Not understood: \['p3'\]"),
    ("compare.weightings", "debias,debias+sobol", r"Not understood: \['debias\+sobol'\]"),
    ("compare.weightings", "debias,debias+uniform", r"two or more distinct runs"),
    ("eval.reference_npz", "/nonexistent/ref.npz", "does not exist"),
])
def test_bad_eval_config(field, value, match):
  config = _tiny_eval_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    compare.validate_compare_config(config)


def test_compare_entries_pair_a_weighting_with_a_timestep_sampler():
  config = _tiny_eval_config("constant,debias+importance,min_snr+logit_normal")
  compare.validate_compare_config(config)
  subs = [compare._trained_run_config(config, n)  # pylint: disable=protected-access
          for n in ("constant", "debias+importance", "min_snr+logit_normal")]
  assert [(s.diffusion.weighting, s.diffusion.timestep_sampler) for s in subs] == [
      ("constant", "uniform"), ("debias", "importance"), ("min_snr", "logit_normal")]


def test_training_statistics_from_the_logged_intervals(tmp_path):
  rows = [{"step": 10 * i, "loss": 1.0, "grad_norm": float(i), "grad_norm_sq": float(i * i + 1),
           "loss_q0": 0.1, "loss_q1": 0.2, "loss_q2": 0.3, "loss_q3": float(i)}
          for i in range(1, 9)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  stats = analyses.training_statistics(str(tmp_path))
  # The last quarter: intervals 7 and 8; E[g] = 7.5, E[g²] = (50 + 65)/2 = 57.5.
  assert stats["n_intervals"] == 2 and (stats["first_step"], stats["last_step"]) == (70, 80)
  assert stats["grad_norm_mean"] == 7.5 and stats["grad_norm_var"] == pytest.approx(1.25)
  assert stats["loss_q3"] == 7.5 and stats["loss_q0"] == pytest.approx(0.1)
  assert analyses.training_statistics(str(tmp_path / "none")) == {"n_intervals": 0}


class _ZeroModel:
  """ε̂ = 0 (and a zero variance output): then x̂0 − x0 = ε/√SNR(t)."""

  def apply(self, variables, x, t, y=None, train=False, rngs=None):
    del variables, t, y, train, rngs
    return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)


def test_x0_error_of_a_zero_model_is_one_over_snr():
  diffusion = diffusion_lib.create_diffusion("linear", 1000, target="eps",
                                             var_type="learned_range")
  images = np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32)
  result = analysis.x0_error_by_timestep(_ZeroModel(), diffusion, {}, images,
                                         jax.random.PRNGKey(0), buckets=1000, batch_size=32)
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  inv_snr = (1 - abar) / abar
  np.testing.assert_allclose(result["x0_mse"], inv_snr, rtol=0.08)
  np.testing.assert_allclose(result["eps_mse"], 1.0, rtol=0.08)
  assert result["t_lo"][:3] == [0, 1, 2] and result["n"] == 64


def test_colour_shift_numbers():
  data = np.random.default_rng(0).integers(0, 128, (4, 8, 8, 3)).astype(np.uint8)
  shifted = data.copy()
  shifted[..., 0] += 127  # red mean up by 127/127.5 in [−1, 1] units, spread unchanged
  table = analysis.colour_shift({2: shifted, 10: data}, data)
  assert table["steps"][2]["mean_shift"] == pytest.approx(127 / 127.5)
  assert table["steps"][2]["std_ratio"] == pytest.approx(1.0)
  assert table["steps"][10]["mean_shift"] == pytest.approx(0.0)
  assert table["steps"][2]["mean"][0] - table["data"]["mean"][0] == pytest.approx(127 / 127.5)


def test_ema_index_picks_the_named_rate():
  saved = tiny_config.get_config()  # ema_rates (0.99, 0.9)
  assert run_lib.ema_index(saved, -1) == 0 and run_lib.ema_index(saved, 0.9) == 1
  with pytest.raises(ValueError, match=r"eval.ema_rate=0.5 is not among"):
    run_lib.ema_index(saved, 0.5, "eval.ema_rate")


def test_static_fraction_separates_static_from_garments():
  from diffusion_jax.data import sources  # pylint: disable=import-outside-toplevel
  real = sources.load_fashion_mnist("test").images[:500]
  static = np.random.default_rng(0).integers(0, 256, (50, 28, 28, 1), dtype=np.uint8)
  assert analysis.static_fraction(real) < 0.01
  assert analysis.static_fraction(static) == 1.0
  assert analysis.static_fraction(np.concatenate([real[:150], static])) == 0.25


def test_gradient_variance_is_computed_for_any_timestep_sampler():
  """Only that it is computed (its value is a measurement, in the README)."""
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import models  # pylint: disable=import-outside-toplevel
  config = _tiny_eval_config()
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 1)), jnp.float32)
  config.diffusion.timestep_sampler = "importance"
  c = config_lib.build(config)
  params = models.init_params(c.model, jax.random.PRNGKey(0))
  out = analysis.gradient_variance(c.model, c.objective, params, images,
                                   jax.random.PRNGKey(1), draws=3)
  assert out["draws"] == 3 and out["trace_var"] > 0 and out["mean_norm"] > 0


def test_sample_images_uses_the_solver_settings():
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import models  # pylint: disable=import-outside-toplevel
  config = _tiny_eval_config()
  model = config_lib.build_model(config)
  params = models.init_params(model, jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(
      jax.random.PRNGKey(a.size), a.shape), params)
  r = run_lib.Run(label="x", workdir="", config=config, params=params, train_step=0)
  one, three = (evaluate.sample_images(
      r, samplers.SamplerOptions(sampler="unipc", steps=4, order=o), 2, 2, 0) for o in (1, 3))
  assert one.shape == (2, 32, 32, 1) and np.abs(one.astype(int) - three.astype(int)).max() > 0
  default = evaluate.sample_images(r, samplers.SamplerOptions(steps=2), 2, 2, 0)
  assert default.dtype == np.uint8


@pytest.mark.slow  # one tiny training in a subprocess, stopped by SIGTERM (~40 s)
def test_a_compare_whose_training_is_preempted_stops_instead_of_starting_the_next_run(
    tmp_path):
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(
      [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
       f"--workdir={tmp_path}", "--mode=compare", "--config.compare.weightings=constant,debias",
       "--config.train.num_steps=100000", "--config.train.log_every=1"],
      cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  metrics = tmp_path / "runs" / "constant" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and "loss" in metrics.read_text()):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert "[constant] stopped at step" in err and "run the same command again" in err
  assert checkpoints.checkpoint_steps(str(tmp_path / "runs" / "constant"))
  assert not (tmp_path / "runs" / "debias").exists()


def _drawn_figure(monkeypatch, results, **kwargs):
  """The matplotlib figure plot_fid_vs_steps draws for `results` (kept open)."""
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, path, dpi=100: figures.append(fig))
  plots.plot_fid_vs_steps(results, "unused.png", **kwargs)
  return figures[0]


def test_fid_plot_labels_few_points_and_draws_sfid_on_its_own_axes(monkeypatch):
  point = lambda fid, sfid: {"fid": fid, "sfid": sfid, "n_samples": 200}
  fig = _drawn_figure(monkeypatch, {"debias": {"ddim": {10: point(130.6, 40.2),
                                                        20: point(118.5, 35.0)}}},
                      model="adm_unet on fashion_mnist 32 px, step 2400")
  fid_ax, sfid_ax = fig.axes
  assert (fid_ax.get_ylabel(), sfid_ax.get_ylabel()) == ("FID", "sFID")
  assert [line.get_linestyle() for line in fid_ax.lines] == ["None"]  # markers, no line
  assert [t.get_text() for t in fid_ax.texts] == ["130.6", "118.5"]
  assert [t.get_text() for t in sfid_ax.texts] == ["40.2", "35.0"]
  title = fig._suptitle.get_text()
  for part in ("adm_unet on fashion_mnist 32 px, step 2400", "ddim", "200 samples"):
    assert part in title


def test_fid_plot_draws_a_line_through_more_than_three_points(monkeypatch):
  curve = {s: {"fid": 300 / s, "n_samples": 64} for s in (5, 10, 20, 50)}
  fig = _drawn_figure(monkeypatch, {"constant": {"unipc": curve}})
  (ax,) = fig.axes
  assert [line.get_linestyle() for line in ax.lines] == ["-"] and not ax.texts
  assert "unipc, 64 samples per point" in fig._suptitle.get_text()


@registry.register("toy_count")
class _ToyCount(registry.Analysis):
  """A toy analysis defined here only: the number of params of each run."""

  def compute(self, ctx):
    return {r.label: sum(x.size for x in jax.tree_util.tree_leaves(r.params))
            for r in ctx.runs}

  def report(self, section, ctx):
    return ["## Toy count", ""] + [f"- {label}: {n}" for label, n in section.items()]


@registry.register("toy_steps")
class _ToySteps(registry.Analysis):

  def compute(self, ctx):
    return {r.label: r.train_step for r in ctx.runs}

  def report(self, section, ctx):
    return ["## Toy steps", ""] + [f"- {label}: {s}" for label, s in section.items()]


def test_a_toy_analysis_added_from_a_test_runs_by_name_and_in_order(tmp_path):
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import models  # pylint: disable=import-outside-toplevel
  config = _tiny_eval_config()
  config.eval.analyses = "toy_steps,toy_count"
  evaluate.validate_eval_config(config)
  model = config_lib.build_model(config)
  params = models.init_params(model, jax.random.PRNGKey(0))
  runs = [run_lib.Run(label, str(tmp_path / label), config, params, step)
          for label, step in (("a", 3), ("b", 7))]
  report = evaluate.evaluate_runs(runs, config, str(tmp_path / "eval"), str(tmp_path))
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert report["analyses"] == ["toy_steps", "toy_count"]
  assert report["toy_steps"] == {"a": 3, "b": 7} and report["toy_count"] == {"a": n, "b": n}
  with open(tmp_path / "eval" / "evaluation.json") as f:
    assert json.load(f)["toy_count"]["b"] == n
  md = (tmp_path / "eval" / "report.md").read_text()
  assert md.index("## Toy steps") < md.index("## Toy count") and "- b: 7" in md
  assert "reference" not in report  # nothing asked for FID, so nothing computed it
  config.eval.analyses = "toy_count,x0_eror"
  with pytest.raises(ValueError, match=r"unknown analysis 'x0_eror'; choose from \[.*"
                                       r"'x0_error'.*'toy_count'"):
    evaluate.validate_eval_config(config)


@pytest.mark.slow  # one tiny class-conditional training, then 5 FID points (~2 min)
def test_fid_sweeps_over_guidance_scale_and_posthoc_ema_length(tmp_path):
  config = _tiny_eval_config()
  config.model.update(class_cond=True, num_classes=10, class_dropout_prob=0.2)
  config.train.update(posthoc_ema=(0.05, 0.1), posthoc_ema_every=2)
  config.eval.update(analyses="fid_vs_steps,fid_vs_guidance,fid_vs_ema_length", steps="3",
                     guidance_scales="1,3", posthoc_ema="0.05,0.08,0.15")
  workdir = str(tmp_path / "run")
  train.train_and_sample(config, workdir)
  report = evaluate.evaluate_workdir(config, workdir)
  label = next(iter(report["runs"]))
  guidance = report["fid_vs_guidance"]["values"][label]
  ema_length = report["fid_vs_ema_length"]["values"][label]
  assert sorted(guidance) == ["1", "3"] and sorted(ema_length) == ["0.05", "0.08", "0.15"]
  # Scale 1 is the unguided sample: the same FID as fid_vs_steps' point.
  assert guidance["1"]["fid"] == report["fid_vs_steps"][label]["ddim"][3]["fid"]
  assert guidance["3"]["fid"] != guidance["1"]["fid"]
  assert len({round(m["fid"], 6) for m in ema_length.values()}) == 3
  assert ema_length["0.08"]["posthoc_ema"]["snapshots"] == [2, 4, 6]
  for name in ("fid_vs_guidance.png", "fid_vs_ema_length.png"):
    assert _is_png(os.path.join(workdir, "eval", name))
  md = open(os.path.join(workdir, "eval", "report.md"), encoding="utf-8").read()
  assert "## FID against classifier-free guidance scale (ddim-3)" in md
  assert "## FID against post-hoc EMA length σ_rel (ddim-3)" in md
