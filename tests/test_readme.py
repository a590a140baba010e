"""The README's measured tables come from commands that still run.

Each test takes a command exactly as the README prints it, shrinks it (fewer steps,
fewer samples; explicit --config.eval.* fields win over the preset) and runs it end to
end. The numbers it produces are not asserted: at this size they mean nothing.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_command(must_contain: str) -> list[str]:
  """The README's `python -m diffusion_jax.main ...` command containing `must_contain`
  (line continuations joined), as an argument list."""
  text = open(os.path.join(REPO, "README.md")).read().replace("\\\n", " ")
  found = [line.strip() for line in text.splitlines()
           if line.strip().startswith("python -m diffusion_jax.main") and must_contain in line]
  assert len(found) == 1, f"README has {len(found)} commands with {must_contain!r}"
  return shlex.split(found[0])


def test_the_quickstart_command_is_the_first_one():
  text = open(os.path.join(REPO, "README.md")).read()
  first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
  assert "pip install -e ." in first_block and "requirements-test" not in first_block
  assert "--config=configs/quickstart.py --workdir=workdirs/quickstart" in first_block


def _run_shrunk(command: list[str], workdir) -> str:
  """Runs a README compare command at a tiny size into `workdir`; returns report.md."""
  args = [a for a in command if not a.startswith("--workdir=")]
  shrink = ["--config.train.num_steps=4", "--config.train.checkpoint_every=4",
            "--config.train.log_every=2", "--config.sample.num_samples=8",
            "--config.sample.batch_size=8", "--config.eval.num_samples=8",
            "--config.eval.num_reference=16", "--config.eval.colour_num_samples=4",
            "--config.eval.x0_num_examples=8", "--config.eval.batch_size=8"]
  run = subprocess.run(
      [sys.executable] + args[1:] + [f"--workdir={workdir}"] + shrink, cwd=REPO,
      capture_output=True, text=True, timeout=1800,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert run.returncode == 0, run.stderr[-3000:]
  return (workdir / "report.md").read_text()


@pytest.mark.slow  # trains two tiny runs and evaluates them (~3 min)
def test_the_weighting_table_command_runs_at_reduced_size(tmp_path):
  report = _run_shrunk(readme_command(
      "--config.compare.weightings=constant,debias --config.eval.preset=quick"), tmp_path)
  for row in ("| constant |", "| debias |", "FID@10", "FID@20", "8 samples per FID point"):
    assert row in report, row


@pytest.mark.slow  # trains five tiny runs and evaluates them (~5 min)
def test_the_five_objective_command_runs_at_reduced_size(tmp_path):
  report = _run_shrunk(readme_command("debias+importance,learned,min_snr"), tmp_path)
  for row in ("| constant |", "| debias+importance |", "| learned |", "| min_snr |",
              "FID@50", "grad-norm variance"):
    assert row in report, row
