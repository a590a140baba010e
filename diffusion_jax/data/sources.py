"""Datasets by name: `data.dataset` picks a registered source.

A source is any random-access sequence of records {"image": uint8 (H, W, C), "label":
int} at `data.image_size`. Built in, all offline:
  fashion_mnist  Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist),
                 else TFDS's `fashion_mnist` prepared in `data.data_dir`; 28×28 grey,
                 zero-padded to `data.image_size`.
  digits         scikit-learn's 8×8 digits (1,797 images), upscaled ×4 (nearest) to 32.
  photo_patches  colour crops from photographs inside scikit-image and scikit-learn
                 (see `photo_patches`), for colour-shift analyses.
  folder         a folder prepared once by `--mode=prepare` (see `image_folder`).
  tfds:NAME      any TFDS dataset prepared in ArrayRecord format under data.data_dir,
                 read with `tfds.data_source` (no TensorFlow); images are resized and
                 centre-cropped like guided-diffusion.
Another source is one function registered with `@register("name")` in a module imported
before the run starts.
"""
from __future__ import annotations

import gzip
import os
from typing import Callable
from typing import Sequence

import numpy as np
from PIL import Image

from diffusion_jax.data import image_folder
from diffusion_jax.data import photo_patches

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)

# name -> (build(data_config, argument) -> source, takes ":ARGUMENT")
SOURCES: dict[str, tuple[Callable[..., Sequence], bool]] = {}


class DataError(ValueError):
  """A dataset that does not fit the config (the message names the field and the fix)."""


def register(name: str, takes_argument: bool = False):
  """Decorator: `build(data_config, argument: str) -> source` becomes `data.dataset=name`
  (`name:ARGUMENT` when `takes_argument`; `argument` is "" otherwise)."""
  def add(build):
    SOURCES[name] = (build, takes_argument)
    return build
  return add


def names() -> list[str]:
  return [f"{n}:NAME" if arg else n for n, (_, arg) in SOURCES.items()]


def _lookup(dataset: str):
  name, colon, argument = dataset.partition(":")
  build, takes_argument = SOURCES.get(name, (None, False))
  if build is None or takes_argument != bool(argument) or (colon and not takes_argument):
    raise DataError(f"Unknown data.dataset {dataset!r}; choose one of {names()}.")
  return build, argument


def check_dataset_name(dataset: str) -> None:
  _lookup(dataset)


def get_source(data_config) -> Sequence:
  """The configured dataset's training source at `data.image_size`."""
  build, argument = _lookup(data_config.dataset)
  return build(data_config, argument)


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


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
  """Images (N, h, w, C) zero-padded, centred, to (N, size, size, C) (e.g. 28 px digits to 32)."""
  h, w = images.shape[1:3]
  if h > size or w > size:
    raise DataError(f"data.image_size={size}: this dataset's {h}×{w} images do not fit; "
                    f"set data.image_size and model.image_size to at least {max(h, w)} "
                    "(they are padded, centred, to it).")
  top, left = (size - h) // 2, (size - w) // 2
  return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def _read_idx(path: str) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


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


@register("fashion_mnist")
def _fashion_mnist(data, _):
  src = load_fashion_mnist(data.split, data.data_dir)
  return ArraySource(pad_to(src.images, data.image_size), src.labels)


@register("digits")
def _digits(data, _):
  if data.image_size != 32:
    raise DataError("digits are 32×32: set data.image_size=32.")
  return load_digits()


@register("photo_patches")
def _photo_patches(data, _):
  if data.split not in ("train", "test"):
    raise DataError(f"photo_patches has splits 'train' and 'test' (other crops of the "
                    f"same photographs), not {data.split!r}.")
  return photo_patches.PhotoPatchSource(data.image_size, seed=0 if data.split == "train" else 1)


@register("folder")
def _folder(data, _):
  return image_folder.PreparedFolderSource(data.data_dir, data.image_size, data.split)


@register("tfds", takes_argument=True)
def _tfds(data, name):
  return TfdsSource(name, data.split, data.data_dir, data.image_size)


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
