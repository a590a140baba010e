"""Metric sanity: Fréchet distance vs scipy, FID/precision/recall behaviour, IS."""
import numpy as np
import pytest
import scipy.linalg

from diffusion_jax.evaluation import metrics


def _scipy_frechet(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  d = mu1 - mu2
  return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_equals_scipy():
  rng = np.random.default_rng(0)
  for dim in (4, 64):
    a, b = rng.normal(size=(500, dim)), rng.normal(0.3, 1.5, size=(400, dim)) @ rng.normal(
        size=(dim, dim)) / np.sqrt(dim)
    sa, sb = metrics.feature_statistics(a), metrics.feature_statistics(b)
    got = metrics.frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])
    want = _scipy_frechet(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])
    assert got == pytest.approx(want, rel=1e-6)


def test_fid_is_zero_on_itself_and_grows_with_noise():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
  assert abs(metrics.fid(feats, feats)["fid"]) < 1e-6
  values = [metrics.fid(feats, feats + s * rng.normal(size=feats.shape))["fid"]
            for s in (0.1, 0.3, 1.0, 3.0)]
  assert all(b > a for a, b in zip(values, values[1:])), values
  assert metrics.fid(feats[:1000], feats[1000:])["n_a"] == 1000


def test_precision_recall():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(300, 8))
  same = metrics.precision_recall(real, real)
  assert same["precision"] == 1.0 and same["recall"] == 1.0
  disjoint = metrics.precision_recall(real, real + 100.0)
  assert disjoint["precision"] == 0.0 and disjoint["recall"] == 0.0
  # A fake set covering only half of the real one keeps precision and loses recall.
  half = real[real[:, 0] > 0]
  pr = metrics.precision_recall(real, half)
  assert pr["precision"] > 0.9 and pr["recall"] < 0.8
  assert pr["n_fake"] == len(half) and pr["k"] == 3


def test_inception_score_bounds():
  confident = np.eye(10)[np.arange(1000) % 10] * 50.0
  assert metrics.inception_score(confident)["is"] == pytest.approx(10.0, rel=1e-3)
  assert metrics.inception_score(np.zeros((1000, 10)))["is"] == pytest.approx(1.0)


def test_bad_shapes():
  with pytest.raises(ValueError, match="features must be"):
    metrics.feature_statistics(np.zeros(5))
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _features(rng, n, shift=0.0):
  return {"pool": rng.normal(shift, 1, (n, 16)), "spatial": rng.normal(shift, 1, (n, 8))}


def test_reference_round_trip_and_sample_quality(tmp_path):
  rng = np.random.default_rng(0)
  ref = metrics.reference_from_features(_features(rng, 400), "unit test")
  path = str(tmp_path / "ref.npz")
  metrics.save_reference(ref, path)
  loaded = metrics.load_reference(path)
  for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
    np.testing.assert_array_equal(loaded[key], ref[key])
  assert loaded["n"] == 400 and loaded["source"] == "unit test"
  same = metrics.sample_quality(_features(rng, 400), loaded)
  shifted = metrics.sample_quality(_features(rng, 400, shift=1.0), loaded)
  assert same["n_samples"] == 400 and same["n_reference"] == 400
  # 16 unit-variance dimensions shifted by 1: ‖Δμ‖² = 16, plus sampling noise.
  assert same["fid"] < 2 and 14 < shifted["fid"] < 19
  assert same["sfid"] < 2 and 6 < shifted["sfid"] < 10
  assert same["precision"] > 0.6 and shifted["precision"] < same["precision"]


def test_guided_diffusion_reference_batch_layout(tmp_path):
  """guided-diffusion's reference .npz: arr_0 images + mu/sigma/mu_s/sigma_s statistics."""
  rng = np.random.default_rng(1)
  feats = _features(rng, 50)

  class FakeInception:  # stands in for the network: the images' features are known
    def features_uint8(self, images):
      assert images.dtype == np.uint8 and len(images) == 50
      return feats

  stats = metrics.reference_from_features(feats)
  path = str(tmp_path / "VIRTUAL_test.npz")
  np.savez(path, arr_0=np.zeros((50, 8, 8, 3), np.uint8), mu=stats["mu"], sigma=stats["sigma"],
           mu_s=stats["mu_s"], sigma_s=stats["sigma_s"])
  with pytest.raises(ValueError, match="Inception is needed"):
    metrics.load_reference(path)
  loaded = metrics.load_reference(path, FakeInception())
  np.testing.assert_array_equal(loaded["mu"], stats["mu"])
  np.testing.assert_allclose(loaded["pool"], feats["pool"].astype(np.float32))
  assert loaded["n"] == 50


def test_reference_file_errors(tmp_path):
  pickled = str(tmp_path / "pickled.npz")
  np.savez(pickled, mu=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="Cannot read reference statistics"):
    metrics.load_reference(pickled)
  wrong = str(tmp_path / "wrong.npz")
  np.savez(wrong, something=np.zeros(3))
  with pytest.raises(ValueError, match="not a reference-statistics file"):
    metrics.load_reference(wrong)


def test_reference_of_another_feature_width_is_refused(tmp_path):
  rng = np.random.default_rng(2)
  ref = metrics.reference_from_features(_features(rng, 40))
  metrics.check_reference_dim(ref, 16, "ok.npz")
  with pytest.raises(ValueError, match=r"wrong.npz .* mu \(16,\) \(expected \(2048,\)\)"):
    metrics.check_reference_dim(ref, 2048, "wrong.npz")
