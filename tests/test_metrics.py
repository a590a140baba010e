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
