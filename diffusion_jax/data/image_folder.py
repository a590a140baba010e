"""Folders of images → a prepared ArrayRecord dataset at the training resolution.

`prepare_image_folder` reads every PNG/JPEG/GIF under a folder (recursively, sorted,
as guided-diffusion lists them), resizes and centre-crops each exactly like
guided-diffusion's `center_crop_arr`, and writes one ArrayRecord file of losslessly
PNG-encoded records plus `dataset.json`. Training then reads it with Grain's
ArrayRecordDataSource, so TensorFlow is never needed.

Class labels (for class-conditional training) follow guided-diffusion: the part of the
file name before the first "_", indexed in sorted order.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffusion_jax import paths

EXTENSIONS = ("jpg", "jpeg", "png", "gif")
METADATA = "dataset.json"
RECORDS = "images.array_record"
SPLIT_RECORDS = {"train": RECORDS, "test": "test.array_record"}
FORMAT = "diffusion_jax.image_folder.v1"  # written into prepared datasets: never renamed


def list_image_files(directory: str) -> list[str]:
  """Image files under `directory` (local or gs://), recursively, each folder's entries
  in sorted order. Only regular files are read: anything else with an image name (a
  FIFO, a socket, a device) would block or never end, so it is named and skipped."""
  out = []
  for path in sorted(paths.path(directory).iterdir(), key=lambda p: p.name):
    if path.is_dir():
      out.extend(list_image_files(os.fspath(path)))
    elif "." in path.name and path.name.rsplit(".", 1)[-1].lower() in EXTENSIONS:
      if paths.is_regular_file(path):
        out.append(os.fspath(path))
      else:
        print(f"Skipping {path}: not a regular file.", file=sys.stderr, flush=True)
  return out


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """guided-diffusion's resize-then-crop: BOX halving while ≥ 2× the target, BICUBIC to
  make the short side `image_size`, then the central square. Returns uint8 (S, S, C)."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


def load_rgb(path: str) -> Image.Image:
  img = Image.open(io.BytesIO(paths.read_bytes(path)))
  img.load()
  return img.convert("RGB")


def encode_record(image: np.ndarray, label: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return struct.pack("<i", label) + buf.getvalue()


def decode_record(data: bytes) -> dict:
  (label,) = struct.unpack("<i", data[:4])
  image = np.array(Image.open(io.BytesIO(data[4:])).convert("RGB"))
  return {"image": image, "label": np.int32(label)}


class BadImageError(ValueError):
  """An image file that cannot be decoded (the message names it)."""


def holdout_files(files: list[str], holdout: str) -> tuple[list[str], list[str]]:
  """(train files, held-out files) for data.holdout: "" (none), a fraction in (0, 1)
  (a fixed random choice, the same on every run), or a second image folder."""
  if not holdout:
    return files, []
  try:
    fraction = float(holdout)
  except ValueError:
    if not paths.isdir(holdout):
      raise FileNotFoundError(f"data.holdout={holdout!r} is neither a fraction in (0, 1) nor "
                              "an image folder.") from None
    held = list_image_files(holdout)
    if not held:
      raise FileNotFoundError(f"No {'/'.join(EXTENSIONS)} files under data.holdout={holdout}.")
    return files, held
  count = round(len(files) * fraction)
  if not 0 < fraction < 1 or not 0 < count < len(files):
    raise ValueError(f"data.holdout={holdout!r} holds out {count} of {len(files)} images; "
                     "give a fraction in (0, 1) that leaves both splits non-empty.")
  chosen = set(np.random.default_rng(0).permutation(len(files))[:count].tolist())
  return ([f for i, f in enumerate(files) if i not in chosen],
          [f for i, f in enumerate(files) if i in chosen])


def prepare_image_folder(image_dir: str, output_dir: str, image_size: int,
                         skip_bad_files: bool = False, class_labels: bool = False,
                         holdout: str = "") -> dict:
  """Writes the prepared dataset into `output_dir`; returns its summary (also saved).

  `holdout` ("" , a fraction such as "0.05", or a second image folder) also writes a
  "test" split of images never trained on (see `holdout_files`). A file that cannot be
  decoded raises BadImageError naming it, unless `skip_bad_files`, in which case it is
  skipped and counted. Both folders may be gs:// paths; a remote dataset is written
  locally first and then uploaded, and its dataset.json, written last, marks it complete.
  """
  if not paths.isdir(image_dir):
    raise FileNotFoundError(f"data.image_dir={image_dir!r} is not a folder.")
  files = list_image_files(image_dir)
  if not files:
    raise FileNotFoundError(f"No {'/'.join(EXTENSIONS)} files under {image_dir}.")
  out = paths.path(output_dir)
  if paths.exists(out / METADATA):
    raise FileExistsError(f"{output_dir} already holds a prepared dataset; remove it or choose "
                          "another data.data_dir.")
  train_files, test_files = holdout_files(files, holdout)
  paths.check_writable(out, "data.data_dir")
  everything = files + test_files
  classes = (sorted({os.path.basename(f).split("_")[0] for f in everything})
             if class_labels else [])
  class_index = {c: i for i, c in enumerate(classes)}
  staging = tempfile.mkdtemp(prefix="prepare_") if paths.is_remote(out) else os.fspath(out)
  splits, skipped = {}, []
  for split, split_files in (("train", train_files), ("test", test_files)):
    if not split_files:
      continue
    written, bad = _write_records(split_files, os.path.join(staging, SPLIT_RECORDS[split]),
                                  image_size, skip_bad_files, class_index, split)
    splits[split] = written
    skipped += bad
  if paths.is_remote(out):
    for split in splits:
      _upload(os.path.join(staging, SPLIT_RECORDS[split]), out / SPLIT_RECORDS[split])
    shutil.rmtree(staging)
  summary = {"format": FORMAT, "source": os.fspath(paths.path(image_dir)),
             "image_size": image_size, "num_records": splits["train"],
             "num_skipped": len(skipped), "skipped": skipped, "classes": classes,
             "splits": splits, "holdout": holdout}
  paths.write_text(out / METADATA, json.dumps(summary, indent=1))
  return summary


def _write_records(files, path: str, image_size: int, skip_bad_files: bool, class_index,
                   split: str) -> tuple[int, list[str]]:
  """Writes `files` as PNG records to `path` (atomically); (records written, skipped)."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  tmp_path = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp_path, "group_size:1")
  written, skipped = 0, []
  try:
    for file in tqdm(files, desc=f"prepare {split}", unit="img"):
      try:
        image = center_crop_arr(load_rgb(file), image_size)
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        if not skip_bad_files:
          raise BadImageError(f"Cannot read image {file}: {e}. Fix or remove it, or set "
                              "config.data.skip_bad_files=True to skip unreadable files.") from None
        skipped.append(file)
        continue
      label = class_index[os.path.basename(file).split("_")[0]] if class_index else 0
      writer.write(encode_record(image, label))
      written += 1
  finally:
    writer.close()
  if written == 0:
    os.remove(tmp_path)
    raise BadImageError(f"None of the {len(files)} {split} files could be read.")
  os.replace(tmp_path, path)
  return written, skipped


def _upload(local: str, remote) -> None:
  """Copies a local file to `remote` (gs://) in chunks, with a progress bar."""
  size = os.path.getsize(local)
  with open(local, "rb") as src, paths.path(remote).open("wb") as dst, tqdm(
      total=size, unit="B", unit_scale=True, desc=f"upload {remote.name}") as bar:
    while chunk := src.read(16 << 20):
      dst.write(chunk)
      bar.update(len(chunk))


class PreparedFolderSource:
  """Random access over a prepared folder dataset (records decoded on read)."""

  def __init__(self, data_dir: str, image_size: int, split: str = "train"):
    import grain  # pylint: disable=import-outside-toplevel
    folder = paths.path(data_dir)
    if not paths.exists(folder / METADATA):
      raise FileNotFoundError(
          f"No prepared dataset in data.data_dir={data_dir!r}. Prepare it once with "
          "--mode=prepare --config.data.image_dir=/path/to/images.")
    self.metadata = json.loads(paths.read_text(folder / METADATA))
    if self.metadata["image_size"] != image_size:
      raise ValueError(f"{data_dir} was prepared at {self.metadata['image_size']} px but "
                       f"data.image_size={image_size}; prepare it again at that size.")
    available = self.metadata.get("splits", {"train": self.metadata["num_records"]})
    if split not in available:
      raise ValueError(
          f"{data_dir} has no {split!r} split (it has {sorted(available)}). A folder "
          "dataset gets a held-out 'test' split when prepared with --config.data.holdout "
          "(a fraction such as 0.05, or a second image folder): prepare it again into a new "
          "data_dir, or evaluate on training images with --config.eval.x0_split=train.")
    # ArrayRecord reads gs:// itself (its Google Cloud C++ client), record by record.
    self._records = grain.sources.ArrayRecordDataSource(
        [os.fspath(folder / SPLIT_RECORDS[split])])

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    return decode_record(self._records[i])


def prepare(config) -> dict:
  """--mode=prepare: config.data.image_dir's images into the dataset at
  config.data.data_dir, at config.data.image_size, with class labels (file-name prefixes)
  when config.model.class_cond and a held-out "test" split per config.data.holdout.
  Returns prepare_image_folder's summary."""
  data = config.data
  if not data.image_dir or not data.data_dir:
    raise ValueError("--mode=prepare needs --config.data.image_dir (the images) and "
                     "--config.data.data_dir (where the prepared dataset goes).")
  return prepare_image_folder(data.image_dir, data.data_dir, data.image_size,
                              skip_bad_files=data.skip_bad_files,
                              class_labels=config.model.class_cond, holdout=data.holdout)
