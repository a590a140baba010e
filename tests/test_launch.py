"""Launch scripts: argument checks and dry runs."""
import json
import os
import subprocess
import sys

import numpy as np
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
  r = _run("gpu_bench.sh", "--dry-run", "--no-flops")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  # ours: 3 batches × 2 dtypes at 256 px, DiT-XL × 2 dtypes, small32; official beside all
  # but the DiT rows
  assert len(lines) == 16
  ours = [l for l in lines if "diffusion_jax.tools.bench" in l]
  official = [l for l in lines if "baseline_bench.py" in l]
  assert len(ours) == 9 and len(official) == 7
  assert "--config.data.batch_size=32" in ours[5] and "compute_dtype=bfloat16" in ours[5]
  assert "--case paper256 --dtype bfloat16 --batch 32 --device cuda" in official[5]
  assert "configs/dit_imagenet256.py" in ours[7] and "batch_size=32" in ours[7]
  assert "--case small32 --dtype float32 --batch 16" in official[6]
  no_base = _run("gpu_bench.sh", "--dry-run", "--no-baseline",
                 "--no-flops").stdout.strip().splitlines()
  assert len(no_base) == 9 and not any("baseline_bench" in l for l in no_base)
  bad = _run("gpu_bench.sh", "--dtypes", "float16")
  assert bad.returncode == 2 and "float32 or bfloat16" in bad.stderr
  missing = _run("gpu_bench.sh", "--baseline-dir", "/nonexistent", "--batches", "8")
  assert missing.returncode == 2 and "--no-baseline" in missing.stderr


@pytest.mark.slow  # lowers the 9 rows' train steps on the CPU (~2 min)
def test_gpu_bench_dry_run_counts_each_rows_flops():
  r = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_bench.sh"), "--dry-run",
                      "--no-baseline"], capture_output=True, text=True, timeout=900,
                     cwd=os.path.dirname(LAUNCH))
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  tflop = {}
  for command, count in zip(lines[::2], lines[1::2]):
    assert "diffusion_jax.tools.bench" in command and count.startswith("#   "), (command, count)
    name, dtype, _, batch = count[4:].split(":")[0].split()
    tflop[(name, dtype, int(batch))] = float(count.split(": ")[1].split()[0])
  assert len(tflop) == 9
  # Linear in the batch, and the same in bf16 (the count is of the math, not the dtype).
  assert tflop[("paper256", "float32", 16)] == pytest.approx(
      2 * tflop[("paper256", "float32", 8)], rel=0.01)
  assert tflop[("paper256", "bfloat16", 32)] == pytest.approx(
      tflop[("paper256", "float32", 32)], rel=0.01)
  # DiT-XL/2 at 256 tokens is 118.6 GFLOPs per forward (the DiT paper, multiply-adds):
  # a train step is about 3 forwards of 2 FLOPs per multiply-add, for 32 images.
  assert tflop[("ditxl256", "float32", 32)] == pytest.approx(32 * 3 * 2 * 118.6e-3, rel=0.05)


def test_hlo_audit_sees_the_bf16_casts_and_matmuls():
  r = subprocess.run([sys.executable, os.path.join(LAUNCH, "hlo_audit.py"),
                      "--config=configs/bench_cpu_small.py", "--batch", "16"],
                     capture_output=True, text=True, timeout=300, cwd=os.path.dirname(LAUNCH))
  assert r.returncode == 0, r.stderr[-2000:]
  rows = {l.split(" | ")[0][2:]: l.split(" | ")[1:] for l in r.stdout.splitlines()
          if l.startswith("| ") and not l.startswith("| count")}
  number = lambda text: float(text.strip(" |").replace(",", ""))
  fp32, bf16 = (lambda k: number(rows[k][0])), (lambda k: number(rows[k][1]))
  assert "convert f32→bf16" not in rows or fp32("convert f32→bf16") == 0
  assert bf16("convert f32→bf16") > 100 and bf16("convert bf16→f32") > 100
  assert fp32("convolution f32×f32→f32") == bf16("convolution bf16×bf16→bf16") + bf16(
      "convolution f32×f32→f32")  # the same convolutions, in either dtype
  assert bf16("convolution bf16×bf16→bf16") > 100
  assert fp32("transpose") == bf16("transpose") > 0


def test_baseline_bench_refuses_a_missing_checkout():
  r = subprocess.run([sys.executable, os.path.join(LAUNCH, "baseline_bench.py"),
                      "--baseline_dir", "/nonexistent"], capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 2 and "no official code at /nonexistent" in r.stderr


def test_bench_table_pairs_rows_and_ratios(tmp_path):
  ours = {"device": "1× GPU", "batch_size": 8, "compute_dtype": "float32", "compile_s": 70.0,
          "train_images_per_s": 100.0, "sample_image_steps_per_s": 400.0,
          "train_step_tflop": 9.0, "train_tflops_per_s": 112.5, "mfu": 0.25,
          "peak_device_memory_gb": 30.0, "step_memory_gb": 21.5}
  (tmp_path / "ours_paper256_float32_b8.json").write_text(json.dumps(ours, indent=1))
  (tmp_path / "official_paper256_float32_b8.json").write_text(
      "progress text\n" + json.dumps({"train_images_per_s": 50.0, "torch": "2.x",
                                      "sample_image_steps_per_s": 100.0}))
  (tmp_path / "official_paper256_bfloat16_b8.json").write_text("")  # a row that died
  table = subprocess.run([sys.executable, os.path.join(LAUNCH, "bench_table.py"),
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
  assert table.returncode == 0, table.stderr
  rows = [l for l in table.stdout.splitlines() if l.startswith("| paper256")]
  assert len(rows) == 2
  assert "| 2.00× |" in rows[0] and "| 4.00× |" in rows[0] and "| 30.0 | 21.5 |" in rows[0]
  # The official row's TFLOP/s: our step's FLOPs at its speed (9 TFLOP × 50/8 per s).
  assert "| 56.2 | 0.125 |" in rows[1]
  assert "skipped official_paper256_bfloat16_b8" in table.stderr


def test_gpu_compare_dry_run_is_a_valid_compare_command():
  import ast  # pylint: disable=import-outside-toplevel
  import shlex  # pylint: disable=import-outside-toplevel

  from configs import quickstart  # pylint: disable=import-outside-toplevel
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.evaluation import compare  # pylint: disable=import-outside-toplevel
  r = _run("gpu_compare.sh", "--dry-run", "--steps", "100")
  assert r.returncode == 0, r.stderr
  args = shlex.split(r.stdout)
  assert args[:4] == ["python3", "-m", "diffusion_jax.main", "--mode=compare"]
  assert "--config=configs/quickstart.py:photo_patches" in args
  config = quickstart.get_config("photo_patches")
  for arg in args:
    if arg.startswith("--config."):
      dotted, value = arg[len("--config."):].split("=", 1)
      *parents, leaf = dotted.split(".")
      node = config
      for part in parents:
        node = node[part]
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass
      node[leaf] = value if not isinstance(value, tuple) else ",".join(map(str, value))
  config_lib.validate_config(config, num_devices=1)
  compare.validate_compare_config(config)
  assert config.train.compute_dtype == "bfloat16" and config.train.num_steps == 100
  assert config.compare.weightings == "constant,debias,debias+importance"
  bad = _run("gpu_compare.sh", "--dataset", "cifar")
  assert bad.returncode == 2 and "--dataset must be" in bad.stderr


@pytest.mark.slow  # 100 quickstart steps in fp32 and in bf16 (~2 min)
def test_bf16_trains_like_fp32_over_100_quickstart_steps():
  """Same seed, batches, t and noise; only train.compute_dtype differs. Both start from the
  same loss (the output layer starts at zero); stated tolerance, from the measured gap
  (README "bf16"): every 10-step mean loss within 15% of fp32's, the 100-step mean within
  5%, and x0 errors within 25% in every timestep quarter."""
  sys.path.insert(0, LAUNCH)
  import bf16_check  # pylint: disable=import-outside-toplevel
  r = bf16_check.train_both(100, x0_examples=32, buckets=4, window=10)
  fp32, bf16 = (np.asarray(r["losses"][d]) for d in ("float32", "bfloat16"))
  assert np.isfinite(bf16).all() and fp32[0] == pytest.approx(bf16[0], rel=1e-4)
  assert max(r["window_gap"]) < 0.15, r["window_gap"]
  assert abs(bf16.mean() - fp32.mean()) / fp32.mean() < 0.05
  ratio = (np.asarray(r["x0_error"]["bfloat16"]["x0_mse"])
           / np.asarray(r["x0_error"]["float32"]["x0_mse"]))
  assert np.all(np.abs(ratio - 1) < 0.25), ratio
  assert "| 750–999 |" in bf16_check.markdown(r)


def test_memory_table_counts_state_and_activations_at_paper_scale():
  sys.path.insert(0, LAUNCH)
  import memory_table  # pylint: disable=import-outside-toplevel
  plain, remat = (memory_table.measure("celebahq256", "float32", r) for r in (False, True))
  assert plain["params"] == remat["params"] == 93_563_910  # the paper's 93.6M
  # params, two Adam moments and one EMA in float32, plus the timestep sampler's loss
  # history (T × 10 floats) and scalars
  assert 16 * plain["params"] <= plain["state_bytes_fsdp1"] < 16 * plain["params"] + 65536
  assert 7.5 < plain["state_bytes_fsdp1"] / plain["state_bytes_fsdp8"] <= 8
  # remat keeps the blocks' inputs only: 3.2 against 8.8 GB at commit a54aa19 (GroupNorm's
  # own backward already keeps only its input and statistics).
  assert remat["activation_bytes"] < plain["activation_bytes"] / 2
  assert "| celebahq256 | 93.6 M | float32 | off |" in memory_table.markdown([plain])


def test_profile_step_accounts_for_the_whole_executor_time(tmp_path):
  out = tmp_path / "profile.json"
  r = subprocess.run([sys.executable, os.path.join(LAUNCH, "profile_step.py"),
                      "--config=tests/tiny_config.py", "--steps=1", "--top=5",
                      f"--json={out}"], capture_output=True, text=True, timeout=300,
                     cwd=os.path.dirname(LAUNCH))
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads(out.read_text())
  shares = [share for _, _, share, _ in result["ops"]]
  assert abs(sum(shares) - 1) < 1e-6 and all(s > 0 for s in shares)
  whats = [what for _, _, _, what in result["ops"]]
  # The CLI default's Eigen convolutions emit no trace events: they are the untraced rest.
  assert any(w.startswith("untraced thunks") for w in whats)
  assert any("dot" in w for w in whats) and "| kind | ms/step | share |" in r.stdout
