"""The recognisability classifier: it separates real images from noise, and caches."""
import numpy as np
import pytest

from diffusion_jax.configs import defaults
from diffusion_jax.data import sources
from diffusion_jax.evaluation import recognisability


@pytest.fixture(scope="module")
def fashion():
  train = sources.load_fashion_mnist("train")
  test = sources.load_fashion_mnist("test")
  pad = lambda a: sources.pad_to(a, 32)
  classifier = recognisability.Classifier.train(pad(train.images[:12000]),
                                                train.labels[:12000], 10)
  return classifier, pad(test.images[:1000]), test.labels[:1000]


def test_classifier_recognises_real_images_and_not_noise(fashion):
  classifier, images, labels = fashion
  probs = classifier.probabilities(images)
  assert probs.shape == (1000, 11)  # the data's classes and junk
  np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
  assert np.mean(probs.argmax(axis=1) == labels) > 0.75
  real = classifier.score(images)
  rng = np.random.default_rng(0)
  # Kinds of junk it was not trained on: Gaussian static, a white square on grey.
  static = np.clip(rng.normal(128, 60, images.shape), 0, 255).astype(np.uint8)
  square = np.full(images.shape, 100, np.uint8)
  square[:, 6:26, 6:26] = 240
  for fake in (static, square):
    score = classifier.score(fake)
    assert score["confident_fraction"] < 0.1 < real["confident_fraction"] - 0.4, score
  assert real["n"] == 1000 and sum(real["class_histogram"]) + real["junk"] == 1000
  assert real["junk"] < 50
  assert min(real["class_histogram"]) > 50  # every class present among real images


def test_saved_classifier_gives_the_same_probabilities(fashion, tmp_path):
  classifier, images, _ = fashion
  classifier.reference = {"confident_fraction": 0.5, "split": "test"}
  loaded = recognisability.Classifier.load(classifier.save(tmp_path / "c.npz"))
  np.testing.assert_allclose(loaded.probabilities(images[:50]),
                             classifier.probabilities(images[:50]), rtol=1e-6, atol=1e-7)
  assert loaded.reference == classifier.reference


def test_classifier_for_trains_once_then_loads(tmp_path, monkeypatch):
  data = defaults.get_config().data
  data.dataset = "digits"
  first = recognisability.classifier_for(data, 10, tmp_path)
  assert (tmp_path / "classifier_digits_32px.npz").exists()
  assert 0 < first.reference["confident_fraction"] <= 1 and first.reference["accuracy"] > 0.5
  monkeypatch.setattr(recognisability.Classifier, "train",
                      lambda *a, **k: pytest.fail("retrained a cached classifier"))
  second = recognisability.classifier_for(data, 10, tmp_path)
  assert second.reference == first.reference
  line = recognisability.summary_line(second.score(np.zeros((4, 32, 32, 1), np.uint8)),
                                      second.reference)
  assert "of 4 samples" in line and "real test images" in line


def test_large_images_are_refused():
  data = defaults.get_config().data
  data.image_size = 256
  with pytest.raises(ValueError, match="eval.classifier=False"):
    recognisability.classifier_for(data, 10, "/nonexistent")
