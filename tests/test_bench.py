"""The benchmark runs on a tiny config and reports every key."""
import json
import subprocess
import sys

from diffusion_jax import bench
from tests import tiny_config


def test_benchmark_reports_every_key():
  result = bench.benchmark(tiny_config.get_config(), runs=2, warmup=1)
  for key in ("train_images_per_s", "sample_image_steps_per_s", "compile_s",
              "peak_host_memory_gb", "train_tflops_per_s"):
    assert result[key] > 0, key
  assert result["device"].endswith("cpu") or "cpu" in result["device"].lower()


def test_bench_cli_writes_json(tmp_path):
  out = tmp_path / "b.json"
  r = subprocess.run([sys.executable, "-m", "diffusion_jax.bench", "--config=tests/tiny_config.py",
                      f"--json={out}", "--runs=1", "--warmup=0"], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "train_images_per_s" in r.stdout
  assert json.loads(out.read_text())["batch_size"] == 8
