"""Training data: Grain pipelines over random-access sources, no TensorFlow.

A source is any random-access sequence of records {"image": uint8 (H, W, C), "label":
int}. The pipeline shards records per process, shuffles with a seed (reshuffled each
epoch), flips at random, scales to [−1, 1] and batches. Its iterator state (a small
dict) goes into checkpoints, so a resumed run sees exactly the next batch.

Built-in offline datasets:
  fashion_mnist  Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist),
                 else TFDS's `fashion_mnist` prepared in `data.data_dir`; 28×28 grey,
                 zero-padded to 32×32.
  digits         scikit-learn's 8×8 digits (1,797 images), upscaled ×4 (nearest).
  photo_patches  colour crops from photographs inside scikit-image and scikit-learn
                 (see `photo_patches`), for colour-shift analyses.
Other sources:
  folder         a folder prepared once by `--mode=prepare` (see `image_folder`).
  tfds:NAME      any TFDS dataset prepared in ArrayRecord format under data.data_dir,
                 read with `tfds.data_source` (no TensorFlow); images are resized and
                 centre-cropped like guided-diffusion.
"""
from __future__ import annotations

import gzip
import os
from typing import Iterator
from typing import Sequence

import grain
import jax
import numpy as np
from PIL import Image

from diffusion_jax.data import image_folder
from diffusion_jax.data import photo_patches

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
DATASETS = ("fashion_mnist", "digits", "photo_patches", "folder", "tfds:NAME")


class ArraySource(Sequence):
  """Random access over in-memory uint8 images (N, H, W, C) and int labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}.")
    self.images, self.labels = images, labels.astype(np.int32)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def _read_idx(path: str) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class DataError(ValueError):
  """A dataset that does not fit the config (the message names the field and the fix)."""


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
  """Images (N, h, w, C) zero-padded, centred, to (N, size, size, C) (e.g. 28 px digits to 32)."""
  h, w = images.shape[1:3]
  if h > size or w > size:
    raise DataError(f"data.image_size={size}: this dataset's {h}×{w} images do not fit; "
                    f"set data.image_size and model.image_size to at least {max(h, w)} "
                    "(they are padded, centred, to it).")
  top, left = (size - h) // 2, (size - w) // 2
  return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def load_fashion_mnist(split: str = "train", data_dir: str = "") -> ArraySource:
  """Fashion-MNIST as 28×28×1 uint8 with labels 0..9 (60k train, 10k test)."""
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise DataError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}.")
  for d in FASHION_MNIST_DIRS:
    img = os.path.join(d, f"{prefix}-images-idx3-ubyte.gz")
    if os.path.exists(img):
      return ArraySource(_read_idx(img)[..., None],
                         _read_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz")))
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    src = tfds.data_source("fashion_mnist", split=split, data_dir=data_dir or None,
                           download=False)
  except Exception as e:  # TFDS raises several types for "not prepared"
    raise FileNotFoundError(
        "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` "
        f"(files under {FASHION_MNIST_DIRS[0]}), or prepare TFDS's fashion_mnist in "
        f"ArrayRecord format under data.data_dir. ({type(e).__name__}: {e})") from None
  images = np.stack([r["image"] for r in src])
  labels = np.array([r["label"] for r in src])
  return ArraySource(images, labels)


def load_digits() -> ArraySource:
  """scikit-learn's digits: 1,797 images of 8×8 (values 0..16), as 32×32 uint8."""
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=import-outside-toplevel
  d = sk_digits()
  img = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  img = img.repeat(4, axis=1).repeat(4, axis=2)[..., None]
  return ArraySource(img, d.target)


def get_source(data_config) -> ArraySource:
  """The configured dataset's training source at `data.image_size`."""
  name = data_config.dataset
  if name == "fashion_mnist":
    src = load_fashion_mnist(data_config.split, data_config.data_dir)
    return ArraySource(pad_to(src.images, data_config.image_size), src.labels)
  if name == "digits":
    src = load_digits()
    if data_config.image_size != 32:
      raise DataError("digits are 32×32: set data.image_size=32.")
    return src
  if name == "photo_patches":
    if data_config.split not in ("train", "test"):
      raise DataError(f"photo_patches has splits 'train' and 'test' (other crops of the "
                       f"same photographs), not {data_config.split!r}.")
    return photo_patches.PhotoPatchSource(data_config.image_size,
                                          seed=0 if data_config.split == "train" else 1)
  if name == "folder":
    return image_folder.PreparedFolderSource(data_config.data_dir, data_config.image_size,
                                             data_config.split)
  if name.startswith("tfds:"):
    return TfdsSource(name[len("tfds:"):], data_config.split, data_config.data_dir,
                      data_config.image_size)
  raise DataError(f"Unknown dataset {name!r}; choose one of {list(DATASETS)}.")


def check_dataset_name(name: str) -> None:
  if name not in DATASETS[:-1] and not (name.startswith("tfds:") and len(name) > 5):
    raise DataError(f"Unknown data.dataset {name!r}; choose one of {list(DATASETS)}.")


class TfdsSource(Sequence):
  """A TFDS dataset in ArrayRecord format, images centre-cropped to `image_size`."""

  def __init__(self, name: str, split: str, data_dir: str, image_size: int):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False)
    except Exception as e:  # TFDS raises several types for "not prepared"
      raise FileNotFoundError(
          f"TFDS dataset {name!r} (split {split!r}) is not prepared in ArrayRecord format under "
          f"data.data_dir={data_dir!r}. Prepare it on a machine with TFDS once: `tfds build "
          f"{name} --file_format=array_record --data_dir=DIR`, then pass "
          f"--config.data.data_dir=DIR. ({type(e).__name__}: {e})") from None
    self._size = image_size

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    record = self._source[i]
    image = np.asarray(record["image"])
    if image.shape[:2] != (self._size, self._size):
      image = image_folder.center_crop_arr(Image.fromarray(image.squeeze()), self._size)
      image = image.reshape(self._size, self._size, -1)
    return {"image": image, "label": np.int32(record.get("label", 0))}


def _preprocess(record, rng: np.random.Generator, random_flip: bool):
  image = record["image"]
  if random_flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return {"image": image.astype(np.float32) / 127.5 - 1.0, "label": record["label"]}


def make_dataset(source, *, batch_size: int, seed: int, random_flip: bool = True,
                 process_index: int | None = None, process_count: int | None = None):
  """An endless Grain IterDataset of host-local batches.

  Args:
    source: random-access records (see `ArraySource`).
    batch_size: the GLOBAL batch size; each process yields batch_size/process_count.
    seed: shuffling and flip seed.
  Yields dicts of image float32 (b, H, W, C) in [−1, 1] and label int32 (b,).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise DataError(f"batch_size={batch_size} does not divide over {process_count} processes.")
  if len(source) < process_count:
    raise DataError(f"The dataset has {len(source)} records, fewer than the processes.")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(lambda r, rng: _preprocess(r, rng, random_flip), seed=seed + 1)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  return ds.to_iter_dataset()


def create_iterator(data_config, seed: int) -> Iterator:
  """The training iterator for a config (call `get_state`/`set_state` to checkpoint it)."""
  return iter(make_dataset(get_source(data_config), batch_size=data_config.batch_size,
                           seed=seed, random_flip=data_config.random_flip))


class Prefetcher:
  """Reads and transfers batches on a background thread, `size` ahead of the step.

  `to_device` turns a host batch into device arrays (e.g. the global sharded batch).
  Each item carries the iterator state from just before its batch, so a checkpoint
  taken between steps records exactly where the next step's data starts.
  """

  def __init__(self, data_iter, to_device, size: int = 2):
    import queue  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    if size < 1:
      raise ValueError(f"prefetch size must be ≥ 1; got {size}.")
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._held = None

    def work():
      try:
        while not self._stop.is_set():
          state = data_iter.get_state()
          item = (to_device(next(data_iter)), state, None)
          while not self._stop.is_set():
            try:
              self._queue.put(item, timeout=0.1)
              break
            except queue.Full:
              continue
      except Exception as e:  # pylint: disable=broad-except
        self._queue.put((None, None, e))

    self._thread = threading.Thread(target=work, daemon=True, name="prefetch")
    self._thread.start()

  def _take(self):
    if self._held is None:
      self._held = self._queue.get()
      if self._held[2] is not None:
        raise self._held[2]
    return self._held

  def next(self):
    """(device batch, iterator state before it)."""
    batch, state, _ = self._take()
    self._held = None
    return batch, state

  def state(self):
    """The iterator state before the next batch (the one `next` would return)."""
    return self._take()[1]

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
