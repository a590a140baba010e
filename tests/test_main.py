"""The command line: bad flags and configs are one line with exit code 2, nothing written."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("override, field", [
    ("--config.train.keep_checkpoints=0", "keep_checkpoints"),
    ("--config.optim.lr=0", "optim.lr"),
    ("--config.sample.sampler=euler", "sample.sampler")])
def test_work_losing_configs_fail_at_once_with_exit_code_2(override, field, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  run = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path / 'wd'}", override], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), timeout=120)
  assert run.returncode == 2, run.stderr[-2000:]
  assert field in run.stderr and "Traceback" not in run.stderr
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("override, message", [
    ("--config.train.foo=3", "Unknown config field config.train.foo: config.train has"),
    ("--config.diffusion.weightin=p2", "did you mean config.diffusion.weighting?"),
    ("--config.train.num_steps=abc", "flag --config.train.num_steps=abc: invalid literal"),
    ("--config.diffusion.weighting=foo", "Unknown loss weighting 'foo'; choose one of"),
    ("--config.eval.preset=fast", "config.eval.preset='fast'"),
    ("--mode=sample", "No checkpoints in"),
    ("--mode=evaluate", "No checkpoints in"),
])
def test_bad_flags_are_one_line_with_exit_code_2(override, message, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  run = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path / 'wd'}", override], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), timeout=120)
  assert run.returncode == 2
  first = run.stderr.splitlines()[0]
  assert first.startswith("error: ") and message in first and "Traceback" not in run.stderr
  assert not (tmp_path / "wd").exists()
