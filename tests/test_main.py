"""The command line: bad flags and configs are one line with exit code 2, nothing written."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("override, field", [
    ("--config.train.keep_checkpoints=0", "keep_checkpoints"),
    ("--config.optim.lr=0", "optim.lr"),
    ("--config.sample.sampler=lms", "sample.sampler")])
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


def _cli(args, tmp_path, **kwargs):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  return subprocess.run([sys.executable, "-m", "diffusion_jax.main"] + args, cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--config=tests/tiny_config.py", "--cpu_devices=0"], "--cpu_devices must be -1"),
    (["--config=tests/tiny_config.py", "--config.model.image_size=16",
      "--config.data.image_size=16", "--config.model.attention_resolutions=2"],
     "digits are 32×32"),
    (["--config=tests/tiny_config.py", "--mode=sample", "--config.sample.batch_size=0"],
     "config.sample.batch_size=0"),
    (["--config=tests/tiny_config.py", "--mode=sample", "--config.sample.num_samples=0"],
     "config.sample.num_samples=0"),
    (["--config=configs/quickstar.py"], "--config=configs/quickstar.py: no such file"),
    (["--config=configs/quickstart.py:foo"], "quickstart dataset 'foo'"),
    (["--config=tests/__init__.py"], "defines no get_config()"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path):
  """Each of these printed a traceback (and `--config` a 41-line double one, exit 1)."""
  run = _cli(args + [f"--workdir={tmp_path / 'wd'}"], tmp_path)
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 2, run.stderr[-2000:]
  assert lines[0].startswith("error: ") and message in lines[0], run.stderr[-2000:]
  assert "Traceback" not in run.stderr
  if args[0].startswith("--config=configs/quickstar") or "tests/__init__" in args[0]:
    assert len(lines) == 2  # the configs there are, each with its docstring's first line
    assert "configs/quickstart.py (Quickstart: the paper's debias weighting" in lines[1]
    assert "configs/celebahq256.py (CelebA-HQ 256 px" in lines[1]
  else:
    assert len(lines) == 1


def test_a_pytorch_file_named_for_a_step_beyond_int32_is_refused():
  from diffusion_jax.tools import convert  # pylint: disable=import-outside-toplevel
  assert convert.step_from_filename("ema_0.9999_500000.pt") == 500000
  assert convert.step_from_filename("model.safetensors") == 0
  with pytest.raises(ValueError, match="names step 99999999999"):
    convert.step_from_filename("ema_0.9999_99999999999.pt")


def test_ctrl_c_while_training_compiles_exits_130_in_one_line(tmp_path):
  """Ctrl-C before the training loop gave a KeyboardInterrupt traceback and then a
  segfault (exit 139), or was swallowed by XLA's callbacks and training went on."""
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "wd"
  proc = subprocess.Popen(
      [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
       f"--workdir={workdir}", "--cpu_devices=1"], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 240
  while not (workdir / "trainer.lock").exists() and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)  # the lock is taken just before the first compile
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert err.strip().splitlines() == [
      "Interrupted (Ctrl-C). Committed checkpoints are kept; run the same command again to "
      "resume."], err[-2000:]


def test_a_config_imports_its_siblings_from_any_working_directory(tmp_path):
  """configs/dit_quickstart.py imports configs/quickstart.py; the project's `configs`
  folder is not an installed package, so only the config's own location can supply it.
  Run from an empty directory with only the library on the path, the config loads and a
  bad sample field is reported, rather than "No module named 'configs'"."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  library_only = tmp_path / "site"
  library_only.mkdir()
  (library_only / "diffusion_jax").symlink_to(os.path.join(REPO, "diffusion_jax"))
  env = dict(os.environ, PYTHONPATH=str(library_only), JAX_PLATFORMS="cpu")
  probe = subprocess.run([sys.executable, "-c", "import configs"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
  assert probe.returncode != 0 and "No module named 'configs'" in probe.stderr
  run = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main",
       f"--config={REPO}/configs/dit_quickstart.py", f"--workdir={tmp_path / 'wd'}",
       "--config.sample.num_samples=0"], cwd=tmp_path, env=env, capture_output=True,
      text=True, timeout=120)
  assert run.returncode == 2, run.stderr[-2000:]
  assert "config.sample.num_samples=0" in run.stderr.splitlines()[0], run.stderr[-2000:]
