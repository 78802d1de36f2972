"""The built-in demo data: axial slices of the MNI152 T1 template that the `nilearn` package ships.

No download is needed: the template (ICBM 2009c nonlinear symmetric, 1 mm, skull-stripped, 197x233x189) and its grey/white
matter probability maps lie inside nilearn's wheel. Axial slice z is `vol[:, :, z].T[::-1]` (anterior up), zero-padded to
256x256. The 142 slices that contain brain are split by position: every 8th slice (offset 3) is `validate`, every 8th
(offset 7) is `test`, the rest is `train`, so every level of the brain is seen in training and in evaluation. Train
slices are kept as they are plus `DEMO_AUGMENTATIONS - 1` deterministic variants (left-right flip, shift of up to
8 px, intensity gain 0.9-1.1), giving a few hundred train images.

This module also writes a directory in the OASIS course layout (`keras_png_slices_*`) from these slices, used by the
tests and benchmarks as a real-image stand-in for an OASIS download.
"""
import functools
import importlib.util
import os
from typing import Iterator

import numpy as np
from PIL import Image

from oasis_jax.errors import UserError

IMAGE_SIZE = 256
SPLITS = ('train', 'validate', 'test')
DEMO_AUGMENTATIONS = 4      # train copies per slice: the original and 3 augmented variants
_EVAL_PERIOD = 8
_EVAL_OFFSETS = {'validate': 3, 'test': 7}
_MIN_BRAIN_FRACTION = 0.02  # a slice holds brain when > 2 % of its pixels exceed 10 % of the volume maximum
_TEMPLATE = 'mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz'


def template_path(kind: str = 't1') -> str:
  """Path of nilearn's MNI152 file: kind is 't1', 'gm' or 'wm'. nilearn is located, not imported (fast)."""
  spec = importlib.util.find_spec('nilearn')
  if spec is None or not spec.submodule_search_locations:
    raise UserError('the demo data needs the `nilearn` package (it ships the MNI152 template): run `make venv`')
  path = os.path.join(spec.submodule_search_locations[0], 'datasets', 'data', _TEMPLATE.format(kind))
  if not os.path.exists(path):
    raise UserError(f'{path}: MNI152 template missing from the installed nilearn package')
  return path


def pad_to_square(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
  """Zero-pads (or centre-crops) a 2-D array to size x size, centred."""
  out = np.zeros((size, size), image.dtype)
  h, w = image.shape
  src_y, src_x = max(0, (h - size) // 2), max(0, (w - size) // 2)
  dst_y, dst_x = max(0, (size - h) // 2), max(0, (size - w) // 2)
  ch, cw = min(h, size), min(w, size)
  out[dst_y:dst_y + ch, dst_x:dst_x + cw] = image[src_y:src_y + ch, src_x:src_x + cw]
  return out


def axial_slice(volume: np.ndarray, z: int) -> np.ndarray:
  """Axial slice z of a RAS volume, anterior up, padded to 256x256."""
  return pad_to_square(volume[:, :, z].T[::-1])


@functools.lru_cache(maxsize=1)
def _volumes():
  import nibabel as nib  # imported lazily: only data preparation needs it
  load = lambda kind: np.asanyarray(nib.load(template_path(kind)).dataobj).astype(np.float32)
  t1, gm, wm = load('t1'), load('gm'), load('wm')
  return t1, segmentation_labels(t1, gm, wm)


def brain_slice_indices(volume: np.ndarray | None = None) -> np.ndarray:
  """The z indices of the axial slices of volume (default: the template, 142 of 189) that contain brain."""
  volume = template_t1() if volume is None else volume
  fraction = (volume > 0.1 * volume.max()).mean(axis=(0, 1))
  return np.nonzero(fraction > _MIN_BRAIN_FRACTION)[0]


def template_t1() -> np.ndarray:
  """The MNI152 T1 template as float32 (x, y, z), max 255."""
  return _volumes()[0]


def split_of_position(position: int) -> str:
  """Which split the position-th brain slice (in z order) belongs to."""
  for split, offset in _EVAL_OFFSETS.items():
    if position % _EVAL_PERIOD == offset:
      return split
  return 'train'


def segmentation_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
  """Tissue labels as in the OASIS course masks: 0 background, 1 CSF, 2 grey matter, 3 white matter."""
  labels = np.where(t1 > 0, 1, 0)
  labels = np.where((gm >= wm) & (gm >= 0.3 * 255), 2, labels)
  labels = np.where((wm > gm) & (wm >= 0.3 * 255), 3, labels)
  return labels.astype(np.uint8)


def _augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
  """Left-right flip (p=0.5), shift of up to 8 px, intensity gain in [0.9, 1.1]; labels follow the geometry."""
  if rng.random() < 0.5:
    image, labels = image[:, ::-1], labels[:, ::-1]
  dy, dx = rng.integers(-8, 9, size=2)
  image = np.roll(image, (dy, dx), axis=(0, 1))
  labels = np.roll(labels, (dy, dx), axis=(0, 1))
  image = np.clip(image.astype(np.float32) * rng.uniform(0.9, 1.1), 0, 255)
  return image, labels


def demo_examples(split: str) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
  """Yields (case_id, slice_index, image uint8 256x256, labels uint8 256x256) for one demo split.

  case_id is the augmentation variant (0 = the template slice itself), slice_index the z of the slice.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}')
  t1, labels_volume = _volumes()
  for position, z in enumerate(brain_slice_indices()):
    if split_of_position(position) != split:
      continue
    image, labels = axial_slice(t1, z), axial_slice(labels_volume, z)
    variants = DEMO_AUGMENTATIONS if split == 'train' else 1
    for variant in range(variants):
      if variant == 0:
        out_image, out_labels = image, labels
      else:
        out_image, out_labels = _augment(image, labels, np.random.default_rng([int(z), variant]))
      yield variant, int(z), np.round(out_image).astype(np.uint8), np.ascontiguousarray(out_labels)


def write_oasis_png_layout(root: str, splits=SPLITS, with_segmentation: bool = True, max_per_split: int | None = None):
  """Writes demo slices as `root/keras_png_slices_{split}/case_XXX_slice_Y.nii.png` (256x256, mode L).

  Masks go to `keras_png_slices_seg_{split}/seg_XXX_slice_Y.nii.png` with the course's grey levels (label * 85).
  Case numbers are 100 + augmentation variant. Returns the number of images written per split.
  """
  counts = {}
  for split in splits:
    image_dir = os.path.join(root, f'keras_png_slices_{split}')
    os.makedirs(image_dir, exist_ok=True)
    seg_dir = os.path.join(root, f'keras_png_slices_seg_{split}')
    if with_segmentation:
      os.makedirs(seg_dir, exist_ok=True)
    counts[split] = 0
    for case, z, image, labels in demo_examples(split):
      if max_per_split is not None and counts[split] >= max_per_split:
        break
      Image.fromarray(image).save(os.path.join(image_dir, f'case_{100 + case:03d}_slice_{z}.nii.png'))
      if with_segmentation:
        Image.fromarray((labels * 85).astype(np.uint8)).save(
            os.path.join(seg_dir, f'seg_{100 + case:03d}_slice_{z}.nii.png'))
      counts[split] += 1
  return counts
