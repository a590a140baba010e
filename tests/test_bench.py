"""The benchmark runs on a tiny config and reports every key."""
import json
import os
import subprocess
import sys

import pytest

from diffusion_jax.tools import allocator
from diffusion_jax.tools import bench
from tests import tiny_config


def test_benchmark_reports_every_key():
  result = bench.benchmark(tiny_config.get_config(), runs=2, warmup=1)
  for key in ("train_images_per_s", "sample_image_steps_per_s", "compile_s",
              "peak_host_memory_gb", "train_tflops_per_s", "state_bytes_per_device"):
    assert result[key] > 0, key
  assert result["device"].endswith("cpu") or "cpu" in result["device"].lower()
  assert result["host_allocator"] in ("tcmalloc", "system")


@pytest.mark.slow  # a subprocess that compiles the step (~30 s)
def test_bench_cli_writes_json(tmp_path):
  out = tmp_path / "b.json"
  r = subprocess.run([sys.executable, "-m", "diffusion_jax.tools.bench",
                      "--config=tests/tiny_config.py",
                      f"--json={out}", "--runs=1", "--warmup=0"], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "train_images_per_s" in r.stdout
  assert json.loads(out.read_text())["batch_size"] == 8


def test_side_by_side_alternates_processes_and_takes_medians(tmp_path, monkeypatch):
  log = tmp_path / "order.txt"
  # As under `allocator.use_tcmalloc`: ours inherit it, the official code does not.
  monkeypatch.setenv(allocator.ENV, "tcmalloc")
  ours = [sys.executable, "-c", (
      "import json, os, sys\n"
      f"open({str(log)!r}, 'a').write('ours ' + str(os.environ.get({allocator.ENV!r})) + '\\n')\n"
      f"n = sum(1 for line in open({str(log)!r}) if line.startswith('ours'))\n"
      "out = [a for a in sys.argv if a.startswith('--json=')][0][7:]\n"
      "json.dump({'train_images_per_s': [0, 10.0, 50.0, 20.0, 5.0, 5.0][n]}, open(out, 'w'))")]
  official = [sys.executable, "-c", (
      "import json, os\n"
      f"open({str(log)!r}, 'a').write('official ' + str(os.environ.get({allocator.ENV!r})) + '\\n')\n"
      "print('building...')\n"
      "print(json.dumps({'images_per_s': 10.0}))")]
  result = bench.side_by_side(ours, official, runs=3)
  assert log.read_text().splitlines() == ["ours tcmalloc", "official None"] * 3
  assert result["ours_images_per_s"] == [10.0, 50.0, 20.0]
  assert result["ours_median"] == 20.0 and result["official_median"] == 10.0
  assert result["ratio"] == 2.0
  assert result["baseline_allocator"] == "system"
  monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_fake.so")
  preload = [sys.executable, "-c", (
      "import json, os\n"
      f"open({str(log)!r}, 'a').write('preload ' + os.environ.get('LD_PRELOAD', '') + '\\n')\n"
      "print(json.dumps({'images_per_s': 10.0}))")]
  result = bench.side_by_side(ours, preload, runs=1, baseline_allocator="tcmalloc")
  assert log.read_text().splitlines()[-1] == "preload libtcmalloc_fake.so"
  assert result["baseline_allocator"] == "tcmalloc"
  broken = [sys.executable, "-c", "import sys; sys.exit('no torch here')"]
  with pytest.raises(RuntimeError, match="no torch here"):
    bench.side_by_side(ours, broken, runs=1)


def test_the_default_baseline_runner_is_the_checkout_beside_the_repository():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  want = os.path.normpath(os.path.join(repo, "..", "shared", "baseline", "run_ref_step.sh"))
  assert bench.FLAGS["baseline_cmd"].default == want


def test_each_bench_config_names_the_official_case_it_equals():
  from absl import app  # pylint: disable=import-outside-toplevel

  from configs import bench_cpu_small  # pylint: disable=import-outside-toplevel
  small, paper64 = bench_cpu_small.get_config(), bench_cpu_small.get_config("paper64")
  # ../shared/baseline/ref_step.py: small32 is 32 px, 64 channels, 32-channel heads,
  # batch 16; paper64 is 64 px, 128 channels, 64-channel heads, batch 4.
  assert (small.model.image_size, small.model.num_channels, small.model.num_head_channels,
          small.data.batch_size) == (32, 64, 32, 16)
  assert (paper64.model.image_size, paper64.model.num_channels,
          paper64.model.num_head_channels, paper64.data.batch_size) == (64, 128, 64, 4)
  assert bench.baseline_case_for(small) == "small32"
  assert bench.baseline_case_for(paper64) == "paper64"
  assert bench.baseline_case_for(paper64, "paper64") == "paper64"
  with pytest.raises(app.UsageError, match="different steps"):
    bench.baseline_case_for(small, "paper64")
  with pytest.raises(app.UsageError, match="No official case"):
    bench.baseline_case_for(tiny_config.get_config())
  with pytest.raises(ValueError, match="paper64"):
    bench_cpu_small.get_config("paper65")
