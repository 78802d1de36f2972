"""grain pipelines over a prepared OASIS dataset: shuffled training batches and ordered evaluation batches.

Images come out as float32 in [0, 1] (uint8 / 255), shaped `[local_devices, per_device_batch, S, S, 1]` for
`jax.pmap`, where S is `config.image_size`: 256, or a divisor of it reached by averaging blocks of pixels (small
sizes are for tests and quick experiments). The training pipeline is a pure function of (seed, step): a grain `MapDataset` of shuffled indices,
re-shuffled every epoch, batched by the global batch; each process reads only its own rows of every global batch.
Its iterator state (`get_state()`, a small dict) is saved with every checkpoint so a resumed run sees the same
batches an uninterrupted one would.
"""
import dataclasses
from typing import Iterator, Sequence

import grain
import numpy as np

from oasis_jax.data.demo_data import IMAGE_SIZE
from oasis_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sharding:
  """How a global batch is split: over processes (hosts), then over each process's local devices."""
  global_batch: int
  process_count: int = 1
  process_index: int = 0
  local_devices: int = 1
  image_size: int = IMAGE_SIZE

  def __post_init__(self):
    devices = self.process_count * self.local_devices
    if self.global_batch <= 0 or self.global_batch % devices:
      raise UserError(f'config.batch_size={self.global_batch}: expected a positive multiple of the '
                      f'device count {devices}')
    if self.image_size <= 0 or IMAGE_SIZE % self.image_size:
      raise UserError(f'config.image_size={self.image_size}: expected a divisor of {IMAGE_SIZE} (e.g. 256, 128, 64)')

  @property
  def per_process(self) -> int:
    return self.global_batch // self.process_count

  @property
  def per_device(self) -> int:
    return self.per_process // self.local_devices


def current_sharding(global_batch: int, image_size: int = IMAGE_SIZE) -> Sharding:
  import jax  # the pipeline itself needs no JAX; only this helper asks it about devices
  return Sharding(global_batch, jax.process_count(), jax.process_index(), jax.local_device_count(), image_size)


def block_mean(images: np.ndarray, size: int) -> np.ndarray:
  """[n, H, H(, 1)] -> [n, size, size, 1]: each output pixel the mean of an (H / size)^2 block."""
  n, factor = images.shape[0], images.shape[1] // size
  return images.reshape(n, size, factor, size, factor, 1).mean(axis=(2, 4))


def to_device_batch(images: np.ndarray, sharding: Sharding) -> np.ndarray:
  """uint8 [n, 256, 256, 1] -> float32 in [0, 1], [local_devices, n // local_devices, S, S, 1]."""
  images = images.astype(np.float32) / np.float32(255)
  if sharding.image_size != images.shape[1]:
    images = block_mean(images, sharding.image_size)
  return images.reshape((sharding.local_devices, -1) + images.shape[1:])


def spaced_rows(count: int, limit: int = -1) -> np.ndarray:
  """Up to `limit` evenly spaced record indices of a split of `count` records (-1: all of them, in order)."""
  if 0 < limit < count:
    return np.linspace(0, count - 1, limit).astype(int)
  return np.arange(count)


def load_groups(source: Sequence, dataset: str, limit: int = -1) -> np.ndarray:
  """For the slices load_images(source, S, limit) returns, which are near-copies of one another [N] int: the same
  template slice in the demo (its augmented copies), else the same case (a subject's slices)."""
  records = source.__getitems__([int(i) for i in spaced_rows(len(source), limit)])
  return np.asarray([r['slice_index'] if dataset == 'demo' else r['case_id'] for r in records], np.int64)


def load_images(source: Sequence, image_size: int, limit: int = -1, chunk: int = 256) -> np.ndarray:
  """Up to `limit` evenly spaced slices of a split (-1: all, in order) as [N, S, S, 1] float32 in [0, 1], read in
  chunks so that a whole OASIS split fits in memory at small S."""
  rows = spaced_rows(len(source), limit)
  out = []
  for begin in range(0, len(rows), chunk):
    part = rows[begin:begin + chunk]
    records = source.__getitems__([int(i) for i in part])
    out.append(to_device_batch(np.stack([r['image'] for r in records]), Sharding(len(part), image_size=image_size))[0])
  return np.concatenate(out)


class _ReadImages:
  """Reads the images of a batch of record indices (a picklable callable, for grain's workers)."""

  def __init__(self, source, sharding: Sharding):
    self.source, self.sharding = source, sharding

  def __call__(self, indices: np.ndarray) -> np.ndarray:
    records = self.source.__getitems__([int(i) for i in indices])
    return to_device_batch(np.stack([r['image'] for r in records]), self.sharding)


def shuffled_rows(num_records: int, sharding: Sharding, seed: int) -> grain.MapDataset:
  """Infinite MapDataset of record indices: element `step` holds this process's rows of that step's global batch,
  re-shuffled every epoch; a pure function of (seed, step)."""
  start, stop = sharding.process_index * sharding.per_process, (sharding.process_index + 1) * sharding.per_process
  return (grain.MapDataset.range(num_records).seed(seed).shuffle().repeat()
          .batch(sharding.global_batch, drop_remainder=True)
          .map(lambda indices: indices[start:stop]))


def train_dataset(source: Sequence, sharding: Sharding, seed: int) -> grain.MapDataset:
  """Infinite MapDataset of training batches: element `step` is the batch of that step, for this process."""
  if len(source) < sharding.global_batch:
    raise UserError(f'config.batch_size={sharding.global_batch}: larger than the training split '
                    f'({len(source)} images)')
  return shuffled_rows(len(source), sharding, seed).map(_ReadImages(source, sharding))


def train_iterator(source: Sequence, sharding: Sharding, seed: int, prefetch: int = 4):
  """A checkpointable iterator over `train_dataset` (`get_state()` / `set_state()`), read by background threads."""
  options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)
  return iter(train_dataset(source, sharding, seed).to_iter_dataset(options))


def code_map_iterator(code_maps: np.ndarray, sharding: Sharding, seed: int):
  """Checkpointable iterator of shuffled batches of in-memory code maps [N, s, s] (stage 2's real data), shaped
  [local_devices, per_device, s, s]."""
  shape = (sharding.local_devices, -1) + code_maps.shape[1:]
  dataset = shuffled_rows(len(code_maps), sharding, seed).map(lambda rows: code_maps[rows].reshape(shape))
  return iter(dataset.to_iter_dataset())


def eval_batches(source: Sequence, sharding: Sharding) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Every image of a split once, in order: (images, mask); the last batch is zero-padded, mask marks real rows.

  images: [local_devices, per_device, H, W, 1] float32; mask: [local_devices, per_device] bool.
  """
  total = len(source)
  for begin in range(0, total, sharding.global_batch):
    indices = np.arange(begin, begin + sharding.global_batch)
    indices = indices[sharding.process_index * sharding.per_process:(sharding.process_index + 1) * sharding.per_process]
    valid = indices < total
    records = source.__getitems__([int(i) for i in indices[valid]])
    images = np.zeros((len(indices), IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    for row, record in zip(np.nonzero(valid)[0], records):
      images[row] = record['image']
    yield to_device_batch(images, sharding), valid.reshape(sharding.local_devices, -1)
