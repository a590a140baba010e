"""The benchmark runs on a tiny config and reports every key."""
import json
import os
import subprocess
import sys

import pytest

from diffusion_jax import bench
from tests import tiny_config


def test_benchmark_reports_every_key():
  result = bench.benchmark(tiny_config.get_config(), runs=2, warmup=1)
  for key in ("train_images_per_s", "sample_image_steps_per_s", "compile_s",
              "peak_host_memory_gb", "train_tflops_per_s", "state_bytes_per_device"):
    assert result[key] > 0, key
  assert result["device"].endswith("cpu") or "cpu" in result["device"].lower()


@pytest.mark.slow  # a subprocess that compiles the step (~30 s)
def test_bench_cli_writes_json(tmp_path):
  out = tmp_path / "b.json"
  r = subprocess.run([sys.executable, "-m", "diffusion_jax.bench", "--config=tests/tiny_config.py",
                      f"--json={out}", "--runs=1", "--warmup=0"], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "train_images_per_s" in r.stdout
  assert json.loads(out.read_text())["batch_size"] == 8


def test_side_by_side_alternates_processes_and_takes_medians(tmp_path):
  log = tmp_path / "order.txt"
  ours = [sys.executable, "-c", (
      "import json, sys\n"
      f"open({str(log)!r}, 'a').write('ours\\n')\n"
      f"n = sum(1 for line in open({str(log)!r}) if line.startswith('ours'))\n"
      "out = [a for a in sys.argv if a.startswith('--json=')][0][7:]\n"
      "json.dump({'train_images_per_s': [0, 10.0, 50.0, 20.0, 5.0][n]}, open(out, 'w'))")]
  official = [sys.executable, "-c", (
      "import json\n"
      f"open({str(log)!r}, 'a').write('official\\n')\n"
      "print('building...')\n"
      "print(json.dumps({'images_per_s': 10.0}))")]
  result = bench.side_by_side(ours, official, runs=3)
  assert log.read_text().split() == ["ours", "official"] * 3
  assert result["ours_images_per_s"] == [10.0, 50.0, 20.0]
  assert result["ours_median"] == 20.0 and result["official_median"] == 10.0
  assert result["ratio"] == 2.0
  broken = [sys.executable, "-c", "import sys; sys.exit('no torch here')"]
  with pytest.raises(RuntimeError, match="no torch here"):
    bench.side_by_side(ours, broken, runs=1)


def test_the_default_baseline_runner_is_the_checkout_beside_the_repository():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  want = os.path.normpath(os.path.join(repo, "..", "shared", "baseline", "run_ref_step.sh"))
  assert bench.FLAGS["baseline_cmd"].default == want
