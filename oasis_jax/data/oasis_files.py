"""Reads a user's OASIS download: the course's PNG slices, or the original OASIS-1 volumes.

Everything here checks its input and raises `UserError` with a one-line message naming the file and what was
expected, before any dataset is written.

PNG layout (`dataset=oasis_png`): `DIR/keras_png_slices_{train,validate,test}/case_XXX_slice_Y.nii.png`, 256x256
8-bit grayscale, optional masks `DIR/keras_png_slices_seg_{split}/seg_XXX_slice_Y.nii.png` (grey levels
0/85/170/255, stored as labels 0-3).

Volume layout (`dataset=oasis_volumes`): any `*.hdr` (Analyze, with its `.img`), `*.nii` or `*.nii.gz` below DIR,
named with the subject id (`OAS1_0001_MR1...`). Per subject one volume is used: the skull-stripped, atlas-registered
`*masked_gfc*` image where present, else the first in sorted order. Each volume is reoriented to RAS; axial slices are
resampled in-plane to 1 mm (bilinear), centre-padded/cropped to 256x256, and mapped to uint8 by the robust rule
`clip(v / p99.5(nonzero voxels of the volume), 0, 1) * 255`. Slices with < 2 % of pixels above 10 % of 255 are
dropped. Splits are subject-disjoint: `crc32(subject id) % 100` < 80 train, < 90 validate, else test.
"""
import os
import re
import zlib
from typing import Iterator

import numpy as np
from PIL import Image

from oasis_jax.data.demo_data import IMAGE_SIZE, SPLITS, pad_to_square
from oasis_jax.errors import UserError

PNG_NAME = re.compile(r'^case_(\d+)_slice_(\d+)\.nii\.png$')
VOLUME_SUFFIXES = ('.hdr', '.nii', '.nii.gz')
_SUBJECT = re.compile(r'OAS\d_(\d+)')
_MIN_BRAIN_FRACTION = 0.02


def _png_split_dir(root: str, split: str, segmentation: bool = False) -> str:
  return os.path.join(root, f'keras_png_slices_seg_{split}' if segmentation else f'keras_png_slices_{split}')


def check_directory(root: str, field: str = 'config.data_dir') -> None:
  if not root:
    raise UserError(f'{field} is empty: expected the directory of your OASIS download')
  if not os.path.isdir(root):
    raise UserError(f'{root}: {field} does not exist or is not a directory')


def list_png_split(root: str, split: str) -> list[tuple[int, int, str]]:
  """(case, slice, path) of every image of a split, sorted; checks the folder and file names."""
  folder = _png_split_dir(root, split)
  if not os.path.isdir(folder):
    raise UserError(f'{folder}: split folder missing (expected keras_png_slices_{{train,validate,test}}/ in {root})')
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith('.png'))
  if not files:
    raise UserError(f'{folder}: no PNG files (expected case_XXX_slice_Y.nii.png)')
  entries = []
  for name in files:
    match = PNG_NAME.match(name)
    if not match:
      raise UserError(f'{os.path.join(folder, name)}: unexpected file name (expected case_XXX_slice_Y.nii.png)')
    entries.append((int(match.group(1)), int(match.group(2)), os.path.join(folder, name)))
  return sorted(entries)


def check_png_layout(root: str) -> None:
  """Fails fast, with one line, on a missing directory, a missing split or an empty split."""
  check_directory(root)
  for split in SPLITS:
    list_png_split(root, split)


def read_grayscale_png(path: str) -> np.ndarray:
  """A 256x256 8-bit grayscale PNG as uint8 (256, 256); anything else is a UserError naming the file."""
  try:
    with Image.open(path) as image:
      image.load()
      mode, size = image.mode, image.size
      array = np.asarray(image)
  except (OSError, SyntaxError, ValueError) as error:
    raise UserError(f'{path}: not a readable PNG ({type(error).__name__}: {error})'.replace('\n', ' ')) from None
  if mode != 'L':
    raise UserError(f'{path}: image mode {mode}, expected 8-bit grayscale (mode L)')
  if size != (IMAGE_SIZE, IMAGE_SIZE):
    raise UserError(f'{path}: size {size[0]}x{size[1]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}')
  return array


def png_examples(root: str, split: str) -> Iterator[tuple[str, dict]]:
  """(key, example) for every slice of a split of the course's PNG layout."""
  seg_folder = _png_split_dir(root, split, segmentation=True)
  for case, slice_index, path in list_png_split(root, split):
    seg_path = os.path.join(seg_folder, f'seg_{case:03d}_slice_{slice_index}.nii.png')
    has_segmentation = os.path.exists(seg_path)
    labels = (np.round(read_grayscale_png(seg_path) / 85.0).astype(np.uint8) if has_segmentation
              else np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8))
    yield f'{case}_{slice_index}', make_example(read_grayscale_png(path), case, slice_index, labels, has_segmentation)


def make_example(image, case_id, slice_index, labels, has_segmentation) -> dict:
  """One record of the TFDS dataset (see tfds_oasis.FEATURES)."""
  return {'image': image[..., None], 'case_id': np.int32(case_id), 'slice_index': np.int32(slice_index),
          'segmentation': labels[..., None], 'has_segmentation': bool(has_segmentation)}


# ---- OASIS-1 volumes ----

def subject_of(path: str) -> str:
  match = _SUBJECT.search(os.path.basename(path))
  return match.group(0) if match else os.path.basename(path).split('.')[0]


def case_id_of(subject: str) -> int:
  """The subject number (OAS1_0042 -> 42), or a stable hash for other names."""
  match = _SUBJECT.search(subject)
  return int(match.group(1)) if match else zlib.crc32(subject.encode()) % 10**6


def split_of_subject(subject: str) -> str:
  bucket = zlib.crc32(subject.encode()) % 100
  return 'train' if bucket < 80 else 'validate' if bucket < 90 else 'test'


def find_volumes(root: str) -> dict[str, str]:
  """subject id -> the volume used for that subject (see the module docstring for the rule)."""
  check_directory(root)
  by_subject: dict[str, list[str]] = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(VOLUME_SUFFIXES):
        path = os.path.join(folder, name)
        by_subject.setdefault(subject_of(path), []).append(path)
  if not by_subject:
    raise UserError(f'{root}: no volumes found (expected OASIS-1 *.hdr/*.img, *.nii or *.nii.gz files)')
  chosen = {}
  for subject, paths in by_subject.items():
    paths.sort()
    masked = [p for p in paths if 'masked_gfc' in os.path.basename(p)]
    chosen[subject] = (masked or paths)[0]
  return dict(sorted(chosen.items()))


def load_volume(path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
  """A volume reoriented to RAS as float32 (X, Y, Z), and its voxel sizes in mm."""
  import nibabel as nib  # imported lazily: only volume preparation needs it
  try:
    image = nib.as_closest_canonical(nib.load(path))
    volume = np.asanyarray(image.dataobj, dtype=np.float32)
  except Exception as error:  # nibabel raises many types for broken files
    raise UserError(f'{path}: unreadable volume ({type(error).__name__}: {error})'.replace('\n', ' ')) from None
  volume = volume.reshape(volume.shape[:3]) if volume.ndim == 4 and volume.shape[3] == 1 else volume
  if volume.ndim != 3 or min(volume.shape) < 2:
    raise UserError(f'{path}: volume of shape {volume.shape}, expected a 3-D image')
  return volume, tuple(float(z) for z in image.header.get_zooms()[:3])


def to_uint8(volume: np.ndarray) -> np.ndarray:
  """The robust intensity rule: clip(v / p99.5 of nonzero voxels, 0, 1) * 255."""
  nonzero = volume[volume > 0]
  scale = np.percentile(nonzero, 99.5) if nonzero.size else 1.0
  return np.round(np.clip(volume / max(scale, 1e-6), 0, 1) * 255).astype(np.uint8)


def volume_slices(path: str) -> Iterator[tuple[int, np.ndarray]]:
  """(z, uint8 256x256) for every axial slice of a volume that contains brain."""
  volume, (zoom_x, zoom_y, _) = load_volume(path)
  volume = to_uint8(volume)
  for z in range(volume.shape[2]):
    image = volume[:, :, z].T[::-1]
    if (image > 0.1 * 255).mean() < _MIN_BRAIN_FRACTION:
      continue
    height, width = round(image.shape[0] * zoom_y), round(image.shape[1] * zoom_x)
    if (height, width) != image.shape:
      image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    yield z, pad_to_square(image)


def volume_examples(root: str, split: str) -> Iterator[tuple[str, dict]]:
  """(key, example) for every brain slice of the subjects that fall into a split."""
  empty = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  for subject, path in find_volumes(root).items():
    if split_of_subject(subject) != split:
      continue
    for z, image in volume_slices(path):
      yield f'{subject}_{z}', make_example(image, case_id_of(subject), z, empty, False)
