"""Launch scripts: argument checks and dry runs."""
import os
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")


def _run(script, *args):
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, timeout=60)


def test_tpu_vm_dry_run():
  r = _run("tpu_vm.sh", "--name", "v4", "--zone", "us-central2-b", "--accelerator", "v4-32",
           "--config", "configs/celebahq256.py:debias", "--workdir", "gs://b/wd", "--spot",
           "--repo", "https://example.invalid/diffusion_jax.git", "--dry-run")
  assert r.returncode == 0, r.stderr
  assert "tpu-vm create v4" in r.stdout and "--accelerator-type=v4-32" in r.stdout
  assert "--spot" in r.stdout and "--worker=all" in r.stdout
  assert "--config=configs/celebahq256.py:debias" in r.stdout
  assert "--workdir=gs://b/wd" in r.stdout and "DIFFUSION_JAX_DISTRIBUTED=1" in r.stdout


def test_gpu_local_dry_run():
  r = _run("gpu_local.sh", "--config", "configs/ffhq256.py:p2", "--workdir", "runs/x",
           "--gpus", "0,1", "--dry-run", "--", "--config.train.num_steps=10")
  assert r.returncode == 0, r.stderr
  assert "CUDA_VISIBLE_DEVICES=0\\,1" in r.stdout or "CUDA_VISIBLE_DEVICES=0,1" in r.stdout
  assert "diffusion_jax.main --mode=train --config=configs/ffhq256.py:p2" in r.stdout
  assert "--config.train.num_steps=10" in r.stdout


def test_slurm_dry_run():
  r = _run("slurm_gpu.sh", "--config", "configs/cifar10.py", "--workdir", "/scratch/c10",
           "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--dry-run")
  assert r.returncode == 0, r.stderr
  for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
               "#SBATCH --requeue", "srun python3 -m diffusion_jax.main --mode=train"):
    assert line in r.stdout


@pytest.mark.parametrize("script,args,message", [
    ("tpu_vm.sh", ["--name", "x", "--zone", "z", "--accelerator", "v4-8", "--config", "c",
                   "--workdir", "/local"], "gs://"),
    ("tpu_vm.sh", ["--zone", "z"], "--name is required"),
    ("gpu_local.sh", ["--config", "c", "--workdir", "w", "--gpus", "a,b"], "comma-separated"),
    ("gpu_local.sh", ["--workdir", "w"], "--config is required"),
    ("slurm_gpu.sh", ["--config", "c", "--workdir", "w", "--nodes", "0",
                      "--gpus-per-node", "8"], "positive integer"),
    ("slurm_gpu.sh", ["--bogus"], "unknown argument"),
])
def test_bad_arguments_are_refused(script, args, message):
  r = _run(script, *args)
  assert r.returncode == 2
  assert message in r.stderr


def test_gpu_bench_dry_run():
  r = _run("gpu_bench.sh", "--dry-run")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 6  # 3 batches × 2 dtypes
  assert "--config.data.batch_size=32" in lines[-1]
  assert "--config.train.compute_dtype=bfloat16" in lines[-1]
  bad = _run("gpu_bench.sh", "--dtypes", "float16")
  assert bad.returncode == 2 and "float32 or bfloat16" in bad.stderr
