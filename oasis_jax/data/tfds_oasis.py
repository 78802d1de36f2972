"""The TFDS dataset of OASIS slices (array_record, no TensorFlow needed) and `prepare`, which builds it once.

Three builder configs, selected by `config.dataset`:
  demo           slices of nilearn's MNI152 template (see demo_data.py); needs no download.
  oasis_png      the course's `keras_png_slices_*` PNGs in `config.data_dir` (TFDS `manual_dir`).
  oasis_volumes  the original OASIS-1 volumes in `config.data_dir` (see oasis_files.py).

Prepared datasets are cached under `CACHE/tfds/<dataset>-<fingerprint>/`, where CACHE is `config.cache_dir`, else
`$OASIS_JAX_CACHE`, else `~/.cache/oasis_jax`, and the fingerprint hashes the source directory's path and the names,
sizes and times of its files: a changed download is prepared anew, an unchanged one is re-used.
"""
import contextlib
import hashlib
import logging
import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from oasis_jax.data import demo_data, oasis_files
from oasis_jax.data.demo_data import IMAGE_SIZE, SPLITS
from oasis_jax.errors import UserError
from oasis_jax.paths import default_cache_dir

DATASETS = ('demo', 'oasis_png', 'oasis_volumes')

FEATURES = tfds.features.FeaturesDict({
    'image': tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8, encoding='bytes'),
    'case_id': tfds.features.Tensor(shape=(), dtype=np.int32),
    'slice_index': tfds.features.Tensor(shape=(), dtype=np.int32),
    'segmentation': tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8, encoding='bytes'),
    'has_segmentation': tfds.features.Tensor(shape=(), dtype=np.bool_),
})


class OasisSlices(tfds.core.GeneratorBasedBuilder):
  """Axial 256x256 uint8 brain slices with case id, slice index and optional tissue labels (0-3)."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='demo', description='MNI152 template slices shipped with nilearn.'),
      tfds.core.BuilderConfig(name='oasis_png', description='OASIS course PNG slices (keras_png_slices_*).'),
      tfds.core.BuilderConfig(name='oasis_volumes', description='OASIS-1 cross-sectional volumes (Analyze/NIfTI).'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download OASIS yourself and pass its directory as `--config.data_dir=PATH`: for `oasis_png` the directory holding
  keras_png_slices_{train,validate,test}/ (and optionally keras_png_slices_seg_*/); for `oasis_volumes` a directory
  with the OASIS-1 disc folders (OAS1_XXXX_MR1/... .hdr/.img).
  """

  # TFDS prints download sizes ("Unknown size") and a "downloaded and prepared" line; nothing is downloaded here,
  # and prepare() prints its own line instead.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=FEATURES, homepage='https://www.oasis-brains.org/',
                                 description='OASIS brain MRI axial slices, 256x256 uint8.')

  def _split_generators(self, dl_manager):
    root = None if self.builder_config.name == 'demo' else os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(split=split, root=root) for split in SPLITS}

  def _generate_examples(self, split, root):
    name = self.builder_config.name
    if name == 'demo':
      for case, z, image, labels in demo_data.demo_examples(split):
        yield f'{case}_{z}', oasis_files.make_example(image, case, z, labels, True)
    elif name == 'oasis_png':
      yield from oasis_files.png_examples(root, split)
    else:
      yield from oasis_files.volume_examples(root, split)


def _fingerprint(root: str, folders_only: tuple[str, ...] | None = None) -> str:
  """Hash of the source path and the (name, size, mtime) of its files: changes when the download changes."""
  digest = hashlib.sha1(os.path.abspath(root).encode())
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    if folders_only is not None and folder != root and os.path.relpath(folder, root).split(os.sep)[0] not in folders_only:
      continue
    for name in sorted(files):
      stat = os.stat(os.path.join(folder, name))
      digest.update(f'{os.path.relpath(folder, root)}/{name}:{stat.st_size}:{stat.st_mtime_ns};'.encode())
  return digest.hexdigest()[:12]


def _check_source(dataset: str, data_dir: str) -> str:
  """Validates the user's source directory up front; returns its fingerprint."""
  if dataset == 'demo':
    demo_data.template_path('t1')
    return 'nilearn'
  if dataset == 'oasis_png':
    oasis_files.check_png_layout(data_dir)
    folders = tuple(f'keras_png_slices_{s}' for s in SPLITS) + tuple(f'keras_png_slices_seg_{s}' for s in SPLITS)
    return _fingerprint(data_dir, folders)
  subjects = oasis_files.find_volumes(data_dir)
  for split in SPLITS:
    if not any(oasis_files.split_of_subject(s) == split for s in subjects):
      raise UserError(f'{data_dir}: no subject falls into the {split} split ({len(subjects)} subjects found; '
                      'subjects are split 80/10/10 by a hash of their id, so a few more are needed)')
  return _fingerprint(data_dir)


def prepare(dataset: str, data_dir: str = '', cache_dir: str = '') -> OasisSlices:
  """The prepared builder for `dataset` (preparing it on first use); `builder.as_data_source(split)` reads it."""
  if dataset not in DATASETS:
    raise UserError(f'config.dataset={dataset!r}: expected one of {", ".join(DATASETS)}')
  if dataset == 'demo' and data_dir:
    raise UserError(f'config.data_dir={data_dir!r} is set, but config.dataset=demo reads no directory: add '
                    '--config.dataset=oasis_png (keras_png_slices_* folders) or --config.dataset=oasis_volumes')
  fingerprint = _check_source(dataset, data_dir)
  tfds_dir = os.path.join(cache_dir or default_cache_dir(), 'tfds', f'{dataset}-{fingerprint}')
  try:
    os.makedirs(tfds_dir, exist_ok=True)
  except OSError as error:
    raise UserError(f'{cache_dir or default_cache_dir()}: cannot hold the prepared dataset ({error.strerror}; '
                    'config.cache_dir or $OASIS_JAX_CACHE)') from None
  with _without_variant_warnings(), _scratch_tempdir():
    builder = OasisSlices(config=dataset, data_dir=tfds_dir, file_format='array_record')
    if not builder.is_prepared():
      print(f'Preparing the {dataset} dataset into {tfds_dir} (once; later runs re-use it) ...', flush=True)
      tfds.disable_progress_bar()
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=data_dir or None))
      counts = ', '.join(f'{split} {builder.info.splits[split].num_examples}' for split in SPLITS)
      print(f'Prepared {dataset}: {counts} slices', flush=True)
  return builder


class _VariantWarnings(logging.Filter):
  """Drops TFDS's "Variant folder ... has no dataset_info.json" warning, which it logs for a dataset not prepared
  yet: the normal case on a first run, announced by prepare() itself."""

  def filter(self, record):
    return not str(record.msg).startswith('Variant folder')


@contextlib.contextmanager
def _without_variant_warnings():
  quiet, absl_logger = _VariantWarnings(), logging.getLogger('absl')
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


@contextlib.contextmanager
def _scratch_tempdir():
  """Points tempfile at a directory removed afterwards: TFDS makes an empty temporary directory (for dataset info
  from its GCS bucket, which is disabled) whenever a builder is made for a dataset not prepared yet, and leaves it."""
  previous = tempfile.tempdir
  with tempfile.TemporaryDirectory(prefix='oasis_jax_tfds_') as scratch:
    tempfile.tempdir = scratch
    try:
      yield
    finally:
      tempfile.tempdir = previous
