"""Training data: Grain pipelines over random-access sources (`sources`), no TensorFlow.

The pipeline shards records per process, shuffles with a seed (reshuffled each epoch),
flips at random, scales to [−1, 1] and batches. Its iterator state (a small dict) goes
into checkpoints, so a resumed run sees exactly the next batch.
"""
from __future__ import annotations

from typing import Iterator

import grain
import jax
import numpy as np

from diffusion_jax.data import sources


def _preprocess(record, rng: np.random.Generator, random_flip: bool):
  image = record["image"]
  if random_flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return {"image": image.astype(np.float32) / 127.5 - 1.0, "label": record["label"]}


def make_dataset(source, *, batch_size: int, seed: int, random_flip: bool = True,
                 process_index: int | None = None, process_count: int | None = None):
  """An endless Grain IterDataset of host-local batches.

  Args:
    source: random-access records (see `sources`).
    batch_size: the GLOBAL batch size; each process yields batch_size/process_count.
    seed: shuffling and flip seed.
  Yields dicts of image float32 (b, H, W, C) in [−1, 1] and label int32 (b,).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise sources.DataError(f"batch_size={batch_size} does not divide over {process_count} processes.")
  if len(source) < process_count:
    raise sources.DataError(f"The dataset has {len(source)} records, fewer than the processes.")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(lambda r, rng: _preprocess(r, rng, random_flip), seed=seed + 1)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  return ds.to_iter_dataset()


def create_iterator(data_config, seed: int) -> Iterator:
  """The training iterator for a config (call `get_state`/`set_state` to checkpoint it)."""
  return iter(make_dataset(sources.get_source(data_config), batch_size=data_config.batch_size,
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
