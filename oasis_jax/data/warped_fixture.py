"""An OASIS-layout dataset of other slices than the demo's, for checking that a recipe is not tuned to the demo.

Every "case" is the MNI152 T1 template under its own random 3-D affine (rotation up to 10 degrees about each axis,
scale 0.9-1.1, shift up to 8 voxels), so its axial slices cut the brain obliquely, at other levels and sizes than
the demo's; then a gamma in [0.8, 1.25], a smooth multiplicative bias field (+-15 %) and light Gaussian noise
(sigma 2 of 255). Cases are subject-disjoint across splits. Written as the course distributes OASIS:

    python -m oasis_jax.data.warped_fixture --out=DIR [--seed=S]
    python train_vqvae.py --config=configs/vqvae.py:demo --config.dataset=oasis_png --config.data_dir=DIR ...
"""
import os

import numpy as np
from absl import app, flags
from PIL import Image

from oasis_jax.data import demo_data

# Cases per split and slices per case: about as many train slices as the demo has (428).
CASES = {'train': 14, 'validate': 2, 'test': 3}
SLICES_PER_CASE = 30


def warp_case(t1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One case: t1 (x, y, z) under a random affine about the volume centre, then gamma, bias field and noise; [0, 255]."""
  from scipy import ndimage  # scipy comes with nilearn; only fixture writing needs it

  angles = np.deg2rad(rng.uniform(-10, 10, size=3))
  rotation = np.eye(3)
  for axis, angle in enumerate(angles):
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    rotation = rotation @ r
  matrix = rotation / rng.uniform(0.9, 1.1)   # output voxel -> input voxel: scale s shrinks by 1 / s
  centre = (np.array(t1.shape) - 1) / 2
  offset = centre - matrix @ centre + rng.uniform(-8, 8, size=3)
  volume = ndimage.affine_transform(t1, matrix, offset, order=1, mode='constant', cval=0.0)
  volume = np.clip(volume / t1.max(), 0, 1) ** rng.uniform(0.8, 1.25)
  coarse = rng.normal(size=(4, 4, 4))
  bias = ndimage.zoom(coarse, np.array(volume.shape) / 4, order=3, mode='nearest')
  bias = 1 + 0.15 * bias / max(np.abs(bias).max(), 1e-6)
  volume = volume * bias[:volume.shape[0], :volume.shape[1], :volume.shape[2]]
  volume = volume * 255 + rng.normal(scale=2.0, size=volume.shape) * (volume > 0)
  return np.clip(volume, 0, 255)


def case_slices(volume: np.ndarray, rng: np.random.Generator, count: int = SLICES_PER_CASE):
  """(z, 256x256 uint8 slice) for `count` brain-containing axial slices of a case, evenly spread, random phase."""
  brain = demo_data.brain_slice_indices(volume)
  picks = np.linspace(brain[0], brain[-1], count) + rng.uniform(-1, 1)
  zs = np.unique(np.clip(np.round(picks).astype(int), brain[0], brain[-1]))
  return [(int(z), np.round(demo_data.axial_slice(volume, z)).astype(np.uint8)) for z in zs]


def write(root: str, seed: int = 1234, cases=None, slices_per_case: int = SLICES_PER_CASE) -> dict:
  """Writes root/keras_png_slices_{split}/case_XXX_slice_Z.nii.png; returns the number of slices per split."""
  cases = dict(CASES if cases is None else cases)
  t1 = demo_data.template_t1()
  rng = np.random.default_rng(seed)
  counts, case_id = {}, 1
  for split, num_cases in cases.items():
    directory = os.path.join(root, f'keras_png_slices_{split}')
    os.makedirs(directory, exist_ok=True)
    counts[split] = 0
    for _ in range(num_cases):
      for z, image in case_slices(warp_case(t1, rng), rng, slices_per_case):
        Image.fromarray(image).save(os.path.join(directory, f'case_{case_id:03d}_slice_{z}.nii.png'))
        counts[split] += 1
      case_id += 1
  return counts


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError('--out=DIR is required')
  counts = write(FLAGS.out, FLAGS.seed)
  print(f'wrote {counts} slices to {FLAGS.out} (seed {FLAGS.seed})')


if __name__ == '__main__':
  FLAGS = flags.FLAGS
  flags.DEFINE_string('out', '', 'directory to write keras_png_slices_{train,validate,test}/ into')
  flags.DEFINE_integer('seed', 1234, 'seed of the cases\' warps, intensities and noise')
  app.run(main)
