"""The path layer: local and gs:// paths (against a local GCS emulator), retries, clear
storage errors, and the metrics file that works without append."""
import os

import numpy as np
import pytest

from diffusion_jax import paths
from diffusion_jax import reporting


def test_local_paths_are_absolute_and_urls_are_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.path("runs/a")) == str(tmp_path / "runs" / "a")
  assert os.fspath(paths.path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
  assert os.fspath(paths.path("gs://bucket/runs") / "a") == "gs://bucket/runs/a"
  with pytest.raises(ValueError, match="empty path"):
    paths.path("")


def test_write_bytes_replaces_whole_files_locally(tmp_path):
  target = tmp_path / "sub" / "f.json"
  paths.write_text(target, "one")
  paths.write_text(target, "two")
  assert target.read_text() == "two"
  assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]  # no temp left


def test_gs_files_round_trip_through_the_emulator(bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  root = paths.path(f"{bucket}/run")
  paths.write_text(root / "a" / "note.txt", "hello")
  assert paths.read_text(f"{bucket}/run/a/note.txt") == "hello"
  assert paths.exists(root / "a" / "note.txt") and paths.isdir(root / "a")
  paths.save_npz(root / "x.npz", arr_0=np.arange(6).reshape(2, 3))
  np.testing.assert_array_equal(paths.load_npz(root / "x.npz")["arr_0"],
                                np.arange(6).reshape(2, 3))
  assert not (tmp_path / "gs:").exists()


def test_a_missing_bucket_is_one_clear_error(gcs):
  with pytest.raises(paths.StorageError, match="no-such-bucket.*exists"):
    paths.check_writable("gs://no-such-bucket/run")


def test_metrics_are_rewritten_whole_and_a_resume_drops_steps_after_the_checkpoint(bucket):
  workdir = f"{bucket}/metrics"
  writer = reporting.MetricWriter(workdir, resume_step=0, flush_every_s=0)
  for step in (0, 2, 4, 6):
    writer.write_scalars(step, {"loss": float(step)})
  writer.close()
  assert [r["step"] for r in reporting.read_metrics(workdir)] == [0, 2, 4, 6]
  # A run restored at step 4 logs steps 4 and 6 again, and a compile time at step 4.
  writer = reporting.MetricWriter(workdir, resume_step=4, flush_every_s=0)
  writer.write_scalars(4, {"compile_s": 1.0})
  writer.write_scalars(6, {"loss": 60.0})
  writer.close()
  rows = reporting.read_metrics(workdir)
  assert [r["step"] for r in rows] == [0, 2, 4, 6]
  assert rows[2] == {"step": 4, "loss": 4.0, "compile_s": 1.0}
  assert rows[3] == {"step": 6, "loss": 60.0}
