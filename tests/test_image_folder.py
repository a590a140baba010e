"""Image folders: guided-diffusion's crop, bad files, prepare → train reads it."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from diffusion_jax.data import image_folder
from diffusion_jax.data import input_pipeline
from diffusion_jax.data import sources
from tests import tiny_config


def _reference_center_crop(pil_image, image_size):
  """guided-diffusion's center_crop_arr, written out directly with PIL."""
  img = pil_image
  while min(img.size) >= 2 * image_size:
    img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
  s = image_size / min(img.size)
  img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), resample=Image.BICUBIC)
  a = np.array(img)
  y, x = (a.shape[0] - image_size) // 2, (a.shape[1] - image_size) // 2
  return a[y:y + image_size, x:x + image_size]


@pytest.mark.parametrize("size", [(97, 131), (301, 77), (64, 64), (513, 260), (33, 32)])
def test_crop_equals_pil_center_crop_arr_bit_for_bit(size):
  rng = np.random.default_rng(sum(size))
  img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
  got = image_folder.center_crop_arr(img, 32)
  assert got.shape == (32, 32, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, _reference_center_crop(img, 32))


def _make_folder(root, n=6, corrupt=True):
  rng = np.random.default_rng(0)
  (root / "sub").mkdir(parents=True)
  for i in range(n):
    arr = rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8)
    folder = root / "sub" if i % 2 else root
    Image.fromarray(arr).save(folder / f"img{i}.{'png' if i % 3 else 'jpg'}")
  (root / "notes.txt").write_text("not an image")
  if corrupt:
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  return root


def test_corrupt_file_is_an_error_naming_it(tmp_path):
  src = _make_folder(tmp_path / "imgs")
  with pytest.raises(image_folder.BadImageError, match="broken.jpg"):
    image_folder.prepare_image_folder(str(src), str(tmp_path / "out"), 32)


def test_skip_bad_files_counts_the_skip_and_training_reads_the_result(tmp_path):
  src = _make_folder(tmp_path / "imgs")
  summary = image_folder.prepare_image_folder(str(src), str(tmp_path / "out"), 32,
                                              skip_bad_files=True)
  assert summary["num_records"] == 6 and summary["num_skipped"] == 1
  assert summary["skipped"][0].endswith("broken.jpg")
  config = tiny_config.get_config()
  config.model.in_channels = 3
  config.data.update(dataset="folder", data_dir=str(tmp_path / "out"), batch_size=4)
  source = sources.get_source(config.data)
  assert len(source) == 6
  first = image_folder.list_image_files(str(src))[0]
  np.testing.assert_array_equal(
      source[0]["image"], image_folder.center_crop_arr(image_folder.load_rgb(first), 32))
  batch = next(input_pipeline.create_iterator(config.data, 0))
  assert batch["image"].shape == (4, 32, 32, 3)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  with pytest.raises(FileExistsError):
    image_folder.prepare_image_folder(str(src), str(tmp_path / "out"), 32, True)


def test_prepare_mode_from_the_command_line(tmp_path):
  src = _make_folder(tmp_path / "imgs", corrupt=False)
  out = tmp_path / "prepared"
  r = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
       f"--workdir={tmp_path / 'wd'}", "--mode=prepare", f"--config.data.image_dir={src}",
       f"--config.data.data_dir={out}"], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Prepared 6 images at 32px" in r.stdout
  assert (out / "dataset.json").exists()
  # A FIFO with an image name blocked prepare forever; now it is named and skipped.
  os.mkfifo(src / "a.png")
  r = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
       f"--workdir={tmp_path / 'wd'}", "--mode=prepare", f"--config.data.image_dir={src}",
       f"--config.data.data_dir={tmp_path / 'second'}"], capture_output=True, text=True,
      timeout=300)
  assert r.returncode == 0 and "Prepared 6 images" in r.stdout, r.stderr[-2000:]
  assert f"Skipping {src / 'a.png'}: not a regular file." in r.stderr
  # Preparing into a folder that holds a dataset: one line, exit 2, nothing changed.
  before = (out / "dataset.json").read_bytes()
  r = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
       f"--workdir={tmp_path / 'wd'}", "--mode=prepare", f"--config.data.image_dir={src}",
       f"--config.data.data_dir={out}"], capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "already holds" in r.stderr
  assert (out / "dataset.json").read_bytes() == before


@pytest.mark.parametrize("holdout", ["0.34", "folder"])
def test_holdout_writes_a_test_split_the_model_never_trains_on(tmp_path, holdout):
  src = _make_folder(tmp_path / "imgs", corrupt=False)
  if holdout == "folder":
    holdout = str(_make_folder(tmp_path / "held", corrupt=False))
  summary = image_folder.prepare_image_folder(str(src), str(tmp_path / "out"), 32,
                                              holdout=holdout)
  config = tiny_config.get_config()
  config.model.in_channels = 3
  config.data.update(dataset="folder", data_dir=str(tmp_path / "out"))
  train = sources.get_source(config.data)
  config.data.split = "test"
  test = sources.get_source(config.data)
  want = (4, 2) if holdout == "0.34" else (6, 6)
  assert (len(train), len(test)) == want == (summary["splits"]["train"],
                                             summary["splits"]["test"])
  if holdout == "0.34":  # a split of one folder: no image in both
    train_px = {train[i]["image"].tobytes() for i in range(len(train))}
    assert not any(test[i]["image"].tobytes() in train_px for i in range(len(test)))


def test_a_folder_without_holdout_has_no_test_split_and_says_how_to_get_one(tmp_path):
  src = _make_folder(tmp_path / "imgs", corrupt=False)
  image_folder.prepare_image_folder(str(src), str(tmp_path / "out"), 32)
  with pytest.raises(ValueError, match="no 'test' split.*--config.data.holdout"):
    image_folder.PreparedFolderSource(str(tmp_path / "out"), 32, split="test")
  for bad, message in (("1.5", "fraction in \\(0, 1\\)"), ("/nonexistent", "neither")):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      image_folder.prepare_image_folder(str(src), str(tmp_path / f"o{len(bad)}"), 32,
                                        holdout=bad)


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
  config = tiny_config.get_config()
  config.data.update(dataset="tfds:cifar10", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tfds build cifar10 --file_format=array_record"):
    sources.get_source(config.data)


def test_unknown_dataset_name():
  config = tiny_config.get_config()
  config.data.dataset = "mnist"
  with pytest.raises(ValueError, match="choose one of .*'tfds:NAME'"):
    sources.check_dataset_name(config.data.dataset)


def test_photo_patches_are_deterministic_colour_crops():
  config = tiny_config.get_config()
  config.model.in_channels = 3
  config.data.update(dataset="photo_patches", image_size=32)
  source = sources.get_source(config.data)
  assert len(source) == 50_000
  a, b = source[123], source[123]
  assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
  np.testing.assert_array_equal(a["image"], b["image"])
  imgs = np.stack([source[i]["image"] for i in range(200)]).astype(np.float64)
  # Colour: the channels differ (unlike a grey dataset), and crops differ from each other.
  assert np.abs(imgs[..., 0] - imgs[..., 2]).mean() > 5
  assert imgs.reshape(200, -1).std(axis=0).mean() > 20
  batch = next(input_pipeline.create_iterator(config.data, 0))
  assert batch["image"].shape == (8, 32, 32, 3)
