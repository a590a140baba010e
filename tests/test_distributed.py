"""Two processes with jax.distributed (CPU collectives, 4 devices each) equal one process
with 8 devices, and their checkpoint restores in a single process."""
import os
import socket
import subprocess
import sys

import jax
import jax.flatten_util
import numpy as np
import pytest

from diffusion_jax import distributed
from diffusion_jax import run as run_lib

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  worker = [sys.executable, os.path.join(TESTS, "distributed_worker.py")]
  port = str(_free_port())
  procs = [subprocess.Popen(worker + [str(tmp_path / "multi"), "multi", port, str(i)],
                            env=_env(4), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  single = subprocess.run(worker + [str(tmp_path / "single"), "single"], env=_env(8),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert single.returncode == 0, single.stderr[-3000:]
  multi_loss = [l for l in outs[0][0].splitlines() if l.startswith("loss")][0].split()
  single_loss = [l for l in single.stdout.splitlines() if l.startswith("loss")][0].split()
  np.testing.assert_allclose(float(multi_loss[1]), float(single_loss[1]), rtol=1e-5)
  np.testing.assert_allclose(float(multi_loss[3]), float(single_loss[3]), rtol=1e-5)
  # Both checkpoints restore here, in one process on one device.
  a = run_lib.load_checkpoint(str(tmp_path / "multi" / "fixed"))
  b = run_lib.load_checkpoint(str(tmp_path / "single" / "fixed"))
  assert int(a.step) == int(b.step) == 3
  p0 = jax.flatten_util.ravel_pytree(
      run_lib.load_checkpoint(str(tmp_path / "single" / "fixed"), step=0).params)[0]
  pa, pb = (jax.flatten_util.ravel_pytree(s.params)[0] for s in (a, b))
  assert float(np.max(np.abs(pa - pb)) / np.max(np.abs(pa - p0))) < 1e-4
  # The full training path ran on two hosts, and only process 0 wrote logs and samples.
  tiny = tmp_path / "multi" / "tiny"
  assert (tiny / "samples.png").exists() and (tiny / "metrics.jsonl").exists()
  assert int(run_lib.load_checkpoint(str(tiny)).step) == 2


def test_cpu_device_count_divides_every_batch_into_shares_of_eight():
  assert distributed.cpu_device_count([16, 64], cores=2) == 2
  assert distributed.cpu_device_count([64, 128], cores=12) == 8
  assert distributed.cpu_device_count([16, 64], cores=12) == 2  # 8 images per device
  assert distributed.cpu_device_count([4], cores=2) == 1  # paper64's batch
  assert distributed.cpu_device_count([48], cores=4) == 4
  assert distributed.cpu_device_count([45], cores=4) == 3
  assert distributed.cpu_device_count([7, 16], cores=8) == 1
  assert distributed.cpu_device_count([4], cores=2, min_per_device=1) == 2


def test_split_host_cpu_respects_explicit_xla_flags(monkeypatch):
  monkeypatch.setattr(distributed, "_jaxlib_version", lambda: "0.9.0")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert distributed.split_host_cpu(2) == 0
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=true")
  assert distributed.split_host_cpu(2) == 2
  assert os.environ["XLA_FLAGS"] == (
      "--xla_cpu_use_onednn=true --xla_force_host_platform_device_count=2")
  with pytest.raises(ValueError, match="cpu_devices=0"):
    monkeypatch.setenv("XLA_FLAGS", "")
    distributed.split_host_cpu(0)


def test_split_host_cpu_picks_the_convolution_library_only_where_measured(monkeypatch):
  library = ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
             "LIBRARY_FUSION_TYPE_REDUCE")
  monkeypatch.setattr(distributed, "_jaxlib_version", lambda: "0.10.2")
  monkeypatch.setenv("XLA_FLAGS", "")
  assert distributed.split_host_cpu(2) == 2
  assert os.environ["XLA_FLAGS"] == f"{library} --xla_force_host_platform_device_count=2"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert distributed.split_host_cpu(2) == 0
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {library}"
  own = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_ELTWISE"
  monkeypatch.setenv("XLA_FLAGS", own)
  assert distributed.split_host_cpu(1) == 1
  assert os.environ["XLA_FLAGS"] == f"{own} --xla_force_host_platform_device_count=1"
  monkeypatch.setattr(distributed, "_jaxlib_version", lambda: "0.11.2")  # not measured
  monkeypatch.setenv("XLA_FLAGS", "")
  distributed.split_host_cpu(2)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


@pytest.mark.slow  # a tiny training, then 1-process and 2-process sampling (~1.5 min)
def test_two_process_sampling_writes_the_same_samples_as_one_process(tmp_path):
  cli = [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
         f"--workdir={tmp_path}"]
  trained = subprocess.run(cli + ["--config.train.num_steps=2", "--config.train.sample_every=0"],
                           env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  sample = cli + ["--mode=sample", "--config.sample.sampler=ddpm",
                  "--config.sample.num_samples=16", "--config.sample.batch_size=8"]
  out = tmp_path / "samples" / "ddpm_3" / "samples.npz"
  single = subprocess.run(sample, env=_env(8), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  one = np.load(out)["arr_0"]
  out.unlink()
  port = str(_free_port())
  procs = [subprocess.Popen(sample, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(_env(4), JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "Wrote 16 samples" in outs[0][0] and "Wrote" not in outs[1][0]
  two = np.load(out)["arr_0"]
  assert one.shape == (16, 32, 32, 1)
  np.testing.assert_array_equal(one, two)


@pytest.mark.slow  # a tiny training, then 1-process and 2-process evaluation (~3 min)
def test_two_process_evaluation_gives_the_fid_of_one_process_and_only_process_0_writes(
    tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  base = [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py"]
  trained = subprocess.run(base + [f"--workdir={tmp_path / 'one'}", "--config.train.num_steps=2",
                                   "--config.train.sample_every=0"],
                           env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  shutil.copytree(tmp_path / "one", tmp_path / "two")  # no cached reference in either
  evaluate = ["--mode=evaluate", "--config.eval.num_samples=8", "--config.eval.num_reference=16",
              "--config.eval.batch_size=8", "--config.eval.samplers=ddim",
              "--config.eval.steps=2", "--config.eval.colour_steps=2",
              "--config.eval.colour_num_samples=8", "--config.eval.x0_num_examples=8",
              "--config.eval.x0_buckets=4",
              "--config.eval.classifier=False"]
  single = subprocess.run(base + [f"--workdir={tmp_path / 'one'}"] + evaluate, env=_env(8),
                          cwd=REPO, capture_output=True, text=True, timeout=900)
  assert single.returncode == 0, single.stderr[-3000:]
  port = str(_free_port())
  procs = [subprocess.Popen(base + [f"--workdir={tmp_path / 'two'}"] + evaluate, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(_env(4), JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "Wrote:" in outs[0][0] and "Wrote:" not in outs[1][0]
  one, two = (json.loads((tmp_path / d / "eval" / "evaluation.json").read_text())
              for d in ("one", "two"))
  assert two["complete"] and two["reused_pieces"] == []
  fid_one = one["fid_vs_steps"]["debias"]["ddim"]["2"]["fid"]
  fid_two = two["fid_vs_steps"]["debias"]["ddim"]["2"]["fid"]
  assert fid_one > 0
  np.testing.assert_allclose(fid_two, fid_one, rtol=1e-4)
  np.testing.assert_allclose(two["x0_error"]["debias"]["x0_mse"],
                             one["x0_error"]["debias"]["x0_mse"], rtol=1e-5)
  # The reference statistics were computed across both processes and cached once.
  assert sorted(p.name for p in (tmp_path / "two").glob("reference_*.npz")) == sorted(
      p.name for p in (tmp_path / "one").glob("reference_*.npz"))
