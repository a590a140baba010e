"""`photo_patches`: random colour crops from photographs shipped inside PyPI packages.

Fashion-MNIST is grey and cannot show colour shift; this offline colour dataset can.
Sources, as their packages distribute them (licences per the packages' own notices):
scikit-image's `astronaut`, `chelsea`, `coffee`, `rocket`, `hubble_deep_field` and
`immunohistochemistry`, and scikit-learn's two `load_sample_images` photos (`china`,
`flower`). Each photo is first reduced with BOX filtering so that its short side is
`4 × image_size`; record i is then a crop of `image_size` pixels from a photo chosen in
proportion to its area, at a position drawn from a generator seeded with (seed, i).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry")


def load_photos() -> list[np.ndarray]:
  """The source photographs, uint8 RGB."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
  photos = [getattr(skimage.data, name)()[..., :3] for name in SKIMAGE_PHOTOS]
  photos += list(load_sample_images().images)
  return [np.ascontiguousarray(p, dtype=np.uint8) for p in photos]


class PhotoPatchSource(Sequence):
  """`num_records` deterministic random crops (H = W = image_size, 3 channels, label 0)."""

  def __init__(self, image_size: int = 32, num_records: int = 50_000, seed: int = 0):
    self.image_size, self.num_records, self.seed = image_size, num_records, seed
    self.photos = []
    for photo in load_photos():
      img = Image.fromarray(photo)
      scale = 4 * image_size / min(img.size)
      if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BOX)
      self.photos.append(np.asarray(img))
    areas = np.array([p.shape[0] * p.shape[1] for p in self.photos], np.float64)
    self.weights = areas / areas.sum()

  def __len__(self):
    return self.num_records

  def __getitem__(self, i):
    if not 0 <= i < self.num_records:
      raise IndexError(i)
    rng = np.random.default_rng((self.seed, int(i)))
    photo = self.photos[rng.choice(len(self.photos), p=self.weights)]
    s = self.image_size
    y = rng.integers(0, photo.shape[0] - s + 1)
    x = rng.integers(0, photo.shape[1] - s + 1)
    return {"image": photo[y:y + s, x:x + s], "label": np.int32(0)}
