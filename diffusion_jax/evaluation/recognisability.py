"""Recognisability of samples, measured by a small classifier of the training data.

A sample counts as recognisable when a classifier trained on the dataset's labelled
training images assigns it one class with probability ≥ `threshold` (0.8). The same
fraction on real held-out images is the ceiling to read it against, and the histogram
of predicted classes shows mode coverage (a model that draws only trousers scores a
high fraction but a one-bar histogram).

Classifiers give confident answers for junk too (a plain classifier calls static a
bag), so this one has one more class, "junk", trained on images with the data's pixel
statistics but no structure (static, pixel-shuffled images, flat fields, saturated
blobs): a sample it calls junk is not recognisable whatever the other probabilities.

The classifier is a small CNN (two conv layers, one hidden dense layer) trained for
two passes over the training split, once per dataset and image size, and cached as an
.npz of its parameters (no pickle) with its held-out scores beside them. It is meant
for small labelled datasets (≤ 64 px); it is not a perceptual metric.
"""
from __future__ import annotations

import json
import os

from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from diffusion_jax import paths
from diffusion_jax.data import sources

THRESHOLD = 0.8
MAX_IMAGE_SIZE = 64


class SmallCNN(nn.Module):
  """Logits (B, num_classes + 1) for images float32 (B, H, W, C) in [−1, 1]; the last
  logit is the junk class."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for features in (16, 32):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes + 1)(x)


def _to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


def junk_images(real: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8 images like `real` (N, H, W, C) in pixel values but with no object: uniform
  static, each real image's pixels shuffled, flat fields and saturated rectangles, in
  equal shares."""
  n, h, w, c = real.shape
  kind = rng.integers(0, 4, n)
  out = rng.integers(0, 256, real.shape, dtype=np.uint8)  # kind 0: static
  flat = real.reshape(n, h * w, c)
  shuffled = np.take_along_axis(flat, rng.random((n, h * w, 1)).argsort(axis=1), axis=1)
  out[kind == 1] = shuffled.reshape(real.shape)[kind == 1]
  out[kind == 2] = rng.integers(0, 256, (int(np.sum(kind == 2)), 1, 1, c), dtype=np.uint8)
  for i in np.flatnonzero(kind == 3):
    top, left = rng.integers(0, h // 3), rng.integers(0, w // 3)
    bottom, right = rng.integers(2 * h // 3, h + 1), rng.integers(2 * w // 3, w + 1)
    out[i] = 0
    out[i, top:bottom, left:right] = 255 - rng.integers(0, 40, (bottom - top, right - left, c))
  return out


class Classifier:
  """A trained SmallCNN and the scores of real held-out images (`reference`)."""

  def __init__(self, num_classes: int, params, reference: dict | None = None):
    self.model = SmallCNN(num_classes)
    self.num_classes = num_classes
    self.params = params
    self.reference = reference or {}
    self._logits = jax.jit(lambda p, x: self.model.apply({"params": p}, x))

  def probabilities(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Probabilities float32 (N, num_classes + 1) of uint8 images (N, H, W, C); the last
    column is junk."""
    out = [jax.nn.softmax(self._logits(self.params, _to_float(images[i:i + batch_size])))
           for i in range(0, len(images), batch_size)]
    return np.asarray(jnp.concatenate(out)) if out else np.zeros((0, self.num_classes + 1))

  def score(self, images: np.ndarray, threshold: float = THRESHOLD) -> dict:
    """confident_fraction (a data class with probability ≥ threshold), class_histogram
    (counts of each data class as the argmax), junk (argmax = junk) and n."""
    probs = self.probabilities(images)
    best = probs.argmax(axis=1)
    confident = (best < self.num_classes) & (probs.max(axis=1) >= threshold)
    counts = np.bincount(best, minlength=self.num_classes + 1)
    return {"confident_fraction": float(np.mean(confident)),
            "class_histogram": counts[:self.num_classes].tolist(),
            "junk": int(counts[self.num_classes]), "threshold": threshold,
            "n": int(len(images))}

  @classmethod
  def train(cls, images: np.ndarray, labels: np.ndarray, num_classes: int, *,
            epochs: int = 2, batch_size: int = 128, lr: float = 3e-3,
            seed: int = 0) -> "Classifier":
    """Trains on uint8 images (N, H, W, C) and int labels (N,) with Adam; a tenth of
    every batch is replaced by junk images (see `junk_images`) labelled num_classes."""
    model = SmallCNN(num_classes)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + images.shape[1:]))["params"]
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
      def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    n = len(images) // batch_size * batch_size
    with tqdm(total=epochs * (n // batch_size), desc="classifier", unit="step",
              leave=False, dynamic_ncols=True) as bar:
      for _ in range(epochs):
        order = rng.permutation(len(images))[:n].reshape(-1, batch_size)
        for idx in order:
          x, y = images[idx], labels[idx].astype(np.int32)
          n_junk = batch_size // 10
          x = np.concatenate([x[n_junk:], junk_images(x[:n_junk], rng)])
          y = np.concatenate([y[n_junk:], np.full(n_junk, num_classes, np.int32)])
          params, opt_state = step(params, opt_state, _to_float(x), jnp.asarray(y))
          bar.update(1)
    return cls(num_classes, params)

  def save(self, path) -> str:
    flat = {"/".join(k): np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(self.params).items()}
    meta = json.dumps({"num_classes": self.num_classes, "reference": self.reference})
    return os.fspath(paths.save_npz(
        path, **flat, __meta__=np.frombuffer(meta.encode(), np.uint8)))

  @classmethod
  def load(cls, path) -> "Classifier":
    arrays = paths.load_npz(path)
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    params = flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(v) for k, v in arrays.items()})
    return cls(meta["num_classes"], params, meta["reference"])


def _all_images(data_config, split: str):
  config = data_config.copy_and_resolve_references()
  config.split = split
  source = sources.get_source(config)
  if isinstance(source, sources.ArraySource):
    return source.images, source.labels
  records = [source[i] for i in range(len(source))]
  return (np.stack([np.asarray(r["image"], np.uint8) for r in records]),
          np.asarray([r["label"] for r in records], np.int32))


def check_supported(data_config) -> None:
  """Raises ValueError when the images are too large for the classifier."""
  if data_config.image_size > MAX_IMAGE_SIZE:
    raise ValueError(f"eval.classifier: the recognisability classifier is for images up to "
                     f"{MAX_IMAGE_SIZE}px, but data.image_size={data_config.image_size}. "
                     "Set eval.classifier=False.")


def cache_path(data_config, cache_dir) -> epath.Path:
  """Where `classifier_for` caches the classifier of `data_config`'s dataset."""
  name = data_config.dataset.replace(":", "_").replace("/", "_")
  return paths.path(cache_dir) / f"classifier_{name}_{data_config.image_size}px.npz"


def classifier_for(data_config, num_classes: int, cache_dir, seed: int = 0, *,
                   cached: bool | None = None, write: bool = True) -> Classifier:
  """The cached classifier of `data_config`'s dataset, trained on first use.

  Trains on the train split, scores the test split (the ceiling) and caches both in
  `cache_path`. cached: whether to load the cache (None: if it exists); write: whether to
  write it after training (False on all but one process of a multi-host job, which
  decide `cached` before any of them writes).
  """
  check_supported(data_config)
  path = cache_path(data_config, cache_dir)
  if paths.exists(path) if cached is None else cached:
    return Classifier.load(path)
  tqdm.write(f"Training the recognisability classifier for {data_config.dataset} → {path}")
  images, labels = _all_images(data_config, "train")
  if len(np.unique(labels)) < 2:
    raise ValueError(f"eval.classifier: {data_config.dataset} has no class labels to train "
                     "a recognisability classifier on. Set eval.classifier=False.")
  classifier = Classifier.train(images, labels, num_classes, seed=seed)
  test_images, test_labels = _all_images(data_config, "test")
  probs = classifier.probabilities(test_images)
  classifier.reference = {
      **classifier.score(test_images), "split": "test",
      "accuracy": float(np.mean(probs.argmax(axis=1) == test_labels))}
  if write:
    classifier.save(path)
  return classifier


def summary_line(score: dict, reference: dict | None = None) -> str:
  """One line: the confident fraction (against real images) and the class histogram."""
  line = (f"recognisable (classifier confidence ≥ {score['threshold']}): "
          f"{score['confident_fraction']:.2f} of {score['n']} samples")
  if reference:
    line += f" (real {reference['split']} images: {reference['confident_fraction']:.2f})"
  return line + f"; classes {score['class_histogram']}, junk {score['junk']}"
