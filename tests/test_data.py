"""The data side: demo slices, the TFDS builder on real PNG and volume files, bad input, the grain pipeline."""
import os
import shutil
import tempfile

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from oasis_jax.data import demo_data, input_pipeline, oasis_files, tfds_oasis, warped_fixture
from oasis_jax.errors import UserError


def test_demo_splits_are_disjoint_and_span_the_brain():
  slices = {split: {z for _, z, _, _ in demo_data.demo_examples(split)} for split in demo_data.SPLITS}
  assert not slices['train'] & slices['validate'] and not slices['train'] & slices['test']
  assert not slices['validate'] & slices['test']
  brain = demo_data.brain_slice_indices()
  assert len(brain) == 142 and set().union(*slices.values()) == set(brain)
  for split in ('validate', 'test'):  # interleaved over the whole brain, not a contiguous block
    zs = sorted(slices[split])
    assert zs[0] < brain[0] + 8 and zs[-1] > brain[-1] - 8 and max(np.diff(zs)) == 8
  train = list(demo_data.demo_examples('train'))
  assert len(train) == demo_data.DEMO_AUGMENTATIONS * len(slices['train'])
  originals = {z: image for case, z, image, _ in train if case == 0}
  t1 = np.asanyarray(nib.load(demo_data.template_path('t1')).dataobj)
  z = sorted(originals)[10]
  np.testing.assert_array_equal(originals[z][11:244, 29:226], t1[:, :, z].T[::-1])  # 233x197 centred in 256x256
  variants = [image for case, zz, image, _ in train if zz == z and case > 0]
  assert all(not np.array_equal(v, originals[z]) for v in variants)  # augmented copies differ from the original


def test_png_builder_reads_what_was_written(oasis_png_dir, cache_dir):
  builder = tfds_oasis.prepare('oasis_png', oasis_png_dir, cache_dir)
  for split in demo_data.SPLITS:
    files = oasis_files.list_png_split(oasis_png_dir, split)
    source = builder.as_data_source(split)
    assert len(source) == len(files)
    records = {(int(r['case_id']), int(r['slice_index'])): r for r in source}
    assert set(records) == {(case, z) for case, z, _ in files}
    case, z, path = files[len(files) // 2]
    record = records[(case, z)]
    np.testing.assert_array_equal(record['image'][..., 0], np.asarray(Image.open(path)))
    seg = np.asarray(Image.open(path.replace('keras_png_slices_', 'keras_png_slices_seg_').replace('case_', 'seg_')))
    assert record['has_segmentation'] and record['image'].dtype == np.uint8 and record['image'].shape == (256, 256, 1)
    np.testing.assert_array_equal(record['segmentation'][..., 0] * 85, seg)
    assert set(np.unique(record['segmentation'])) <= {0, 1, 2, 3}


def test_prepared_dataset_is_cached_and_refreshed_on_change(oasis_png_dir, tmp_path, capfd, caplog):
  root = str(tmp_path / 'oasis')
  shutil.copytree(oasis_png_dir, root)
  cache = str(tmp_path / 'cache')
  first = tfds_oasis.prepare('oasis_png', root, cache)
  out, err = capfd.readouterr()
  # Our two lines, not TFDS's download sizes or its "no dataset_info.json" warning for local data.
  assert len(out.splitlines()) == 2, out
  assert out.startswith(f'Preparing the oasis_png dataset into {cache}/tfds/oasis_png-')
  assert out.splitlines()[1] == 'Prepared oasis_png: train 40, validate 18, test 17 slices'
  assert 'Unknown size' not in out + err and not [r for r in caplog.records if 'Variant folder' in r.getMessage()]
  stamp = os.path.getmtime(first.data_dir)
  again = tfds_oasis.prepare('oasis_png', root, cache)
  assert capfd.readouterr().out == ''   # prepared once: silent
  assert again.data_dir == first.data_dir and os.path.getmtime(again.data_dir) == stamp
  os.remove(oasis_files.list_png_split(root, 'test')[0][2])
  changed = tfds_oasis.prepare('oasis_png', root, cache)
  assert changed.data_dir != first.data_dir
  assert len(changed.as_data_source('test')) == len(first.as_data_source('test')) - 1


def _subjects_for_each_split(count_per_split):
  found = {split: [] for split in demo_data.SPLITS}
  number = 1
  while min(len(v) for v in found.values()) < count_per_split:
    subject = f'OAS1_{number:04d}'
    split = oasis_files.split_of_subject(subject)
    if len(found[split]) < count_per_split:
      found[split].append(subject)
    number += 1
  return found


def test_volume_builder_nifti_and_analyze_subject_disjoint(tmp_path, cache_dir):
  t1 = np.asanyarray(nib.load(demo_data.template_path('t1')).dataobj).astype(np.int16)
  volume = t1[::2, ::2, ::4] * 3  # 2x2x4 mm voxels, arbitrary intensity scale
  affine = np.diag([2.0, 2.0, 4.0, 1.0])
  root = tmp_path / 'oasis1'
  subjects = _subjects_for_each_split(1)
  for i, subject in enumerate(s for split in demo_data.SPLITS for s in subjects[split]):
    folder = root / f'disc1/{subject}_MR1/PROCESSED/MPRAGE/T88_111'
    folder.mkdir(parents=True)
    if i % 2:   # Analyze pair, as OASIS-1 ships, with a 4th singleton axis
      nib.save(nib.AnalyzeImage(volume[..., None], affine), str(folder / f'{subject}_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr'))
    else:
      nib.save(nib.Nifti1Image(volume, affine), str(folder / f'{subject}_MR1_mpr_n4_anon_111_t88_masked_gfc.nii.gz'))
    nib.save(nib.Nifti1Image(volume * 0, affine), str(folder / f'{subject}_MR1_mpr_n4_anon_111_t88_gfc.nii.gz'))
  builder = tfds_oasis.prepare('oasis_volumes', str(root), cache_dir)
  cases = {}
  for split in demo_data.SPLITS:
    records = list(builder.as_data_source(split))
    cases[split] = {int(r['case_id']) for r in records}
    assert cases[split] == {int(s[5:]) for s in subjects[split]}
    # the masked image is used (the unmasked one is all zeros, so it would give no slices)
    assert 20 <= len(records) <= volume.shape[2]
    assert max(r['image'].max() for r in records) == 255  # the robust rescaling reaches the top of the range
    assert all(r['image'].shape == (256, 256, 1) for r in records)
    # resampled in-plane to 1 mm: the brain spans as many pixels as in the 1 mm template
    extent = lambda images, axis: max(np.ptp(np.nonzero((i > 25).any(axis=axis))[0]) for i in images if (i > 25).any())
    template_slices = [t1[:, :, z].T for z in range(0, t1.shape[2], 4)]
    for axis in (0, 1):
      assert abs(extent([r['image'][..., 0] for r in records], axis) - extent(template_slices, axis)) <= 6
  assert not cases['train'] & cases['test'] and not cases['train'] & cases['validate']


def _small_layout(oasis_png_dir, tmp_path, per_split=2):
  root = tmp_path / 'oasis'
  for split in demo_data.SPLITS:
    (root / f'keras_png_slices_{split}').mkdir(parents=True)
    for _, _, path in oasis_files.list_png_split(oasis_png_dir, split)[:per_split]:
      shutil.copy(path, root / f'keras_png_slices_{split}')
  return root


def _one_png(root, split='train'):
  return oasis_files.list_png_split(str(root), split)[0][2]


def _assert_user_error(match, *args):
  with pytest.raises(UserError, match=match) as info:
    tfds_oasis.prepare(*args)
  assert '\n' not in str(info.value)


def test_bad_input_gets_one_clear_line(oasis_png_dir, tmp_path):
  cache = str(tmp_path / 'cache')
  _assert_user_error(r'/nonexistent: config.data_dir does not exist', 'oasis_png', '/nonexistent', cache)
  _assert_user_error(r"config.dataset='mnist': expected one of demo, oasis_png, oasis_volumes", 'mnist', '', cache)
  _assert_user_error(r'config.data_dir is empty', 'oasis_png', '', cache)
  root = _small_layout(oasis_png_dir, tmp_path)
  shutil.rmtree(root / 'keras_png_slices_validate')
  _assert_user_error(r'keras_png_slices_validate: split folder missing', 'oasis_png', str(root), cache)
  (root / 'keras_png_slices_validate').mkdir()
  _assert_user_error(r'keras_png_slices_validate: no PNG files', 'oasis_png', str(root), cache)


@pytest.mark.parametrize('damage, message', [
    ('corrupt', r'case_\S+\.nii\.png: not a readable PNG'),
    ('size', r'case_\S+\.nii\.png: size 128x128, expected 256x256'),
    ('rgb', r'case_\S+\.nii\.png: image mode RGB, expected 8-bit grayscale'),
    ('name', r'brain\.png: unexpected file name \(expected case_XXX_slice_Y\.nii\.png\)'),
])
def test_bad_png_names_the_file(oasis_png_dir, tmp_path, damage, message):
  root = _small_layout(oasis_png_dir, tmp_path)
  path = _one_png(root)
  image = Image.open(path)
  if damage == 'corrupt':
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
  elif damage == 'size':
    image.resize((128, 128)).save(path)
  elif damage == 'rgb':
    image.convert('RGB').save(path)
  else:
    image.save(os.path.join(os.path.dirname(path), 'brain.png'))
  _assert_user_error(message, 'oasis_png', str(root), str(tmp_path / 'cache'))


def test_unreadable_volume_names_the_file(tmp_path):
  folder = tmp_path / 'vols'
  folder.mkdir()
  (folder / 'OAS1_0001_MR1_masked_gfc.nii.gz').write_bytes(b'not a volume at all')
  with pytest.raises(UserError, match=r'OAS1_0001_MR1_masked_gfc\.nii\.gz: unreadable volume'):
    list(oasis_files.volume_slices(str(folder / 'OAS1_0001_MR1_masked_gfc.nii.gz')))
  with pytest.raises(UserError, match=r'no subject falls into the'):
    tfds_oasis.prepare('oasis_volumes', str(folder), str(tmp_path / 'cache'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match=r'empty: no volumes found \(expected OASIS-1'):
    tfds_oasis.prepare('oasis_volumes', str(tmp_path / 'empty'), str(tmp_path / 'cache'))


def test_subject_split_is_a_stable_hash():
  # crc32('OAS1_0001') % 100 = 43, ... (buckets 43, 21, 87, 28, 62, 20, 94, 35, 29, 80, 70, 40): < 80 train, < 90
  # validate, else test. Written out, so that a change of the rule (or a salted hash) cannot pass.
  assert [oasis_files.split_of_subject(f'OAS1_{i:04d}') for i in range(1, 13)] == [
      'train', 'train', 'validate', 'train', 'train', 'train', 'test', 'train', 'train', 'validate', 'train', 'train']
  assert sum(oasis_files.split_of_subject(f'OAS1_{i:04d}') == 'train' for i in range(1, 417)) == 340   # 82 %
  assert oasis_files.case_id_of('OAS1_0042_MR1') == 42


# ---- the grain pipeline ----

@pytest.fixture(scope='module')
def demo_sources(cache_dir):
  builder = tfds_oasis.prepare('demo', cache_dir=cache_dir)
  return {split: builder.as_data_source(split) for split in demo_data.SPLITS}


def test_train_batches_are_shaped_for_local_devices(demo_sources):
  import jax
  assert jax.local_device_count() == 2
  sharding = input_pipeline.current_sharding(8)
  batch = next(input_pipeline.train_iterator(demo_sources['train'], sharding, seed=0))
  assert batch.shape == (2, 4, 256, 256, 1) and batch.dtype == np.float32
  assert 0.0 <= batch.min() and batch.max() <= 1.0 and batch.max() > 0.5
  sums = jax.pmap(lambda x: x.sum())(batch)  # each device gets its own rows
  np.testing.assert_allclose(np.asarray(sums), batch.reshape(2, -1).sum(1), rtol=1e-5)


def test_train_pipeline_is_deterministic_and_reshuffles_each_epoch(demo_sources):
  source = demo_sources['train']
  sharding = input_pipeline.Sharding(global_batch=2 * (len(source) // 8), local_devices=2)
  dataset = input_pipeline.train_dataset(source, sharding, seed=3)
  again = input_pipeline.train_dataset(source, sharding, seed=3)
  np.testing.assert_array_equal(dataset[5], again[5])
  assert not np.array_equal(dataset[0], input_pipeline.train_dataset(source, sharding, seed=4)[0])
  indices = (input_pipeline.grain.MapDataset.range(len(source)).seed(3).shuffle().repeat())
  epoch0 = [indices[i] for i in range(len(source))]
  epoch1 = [indices[i] for i in range(len(source), 2 * len(source))]
  assert sorted(epoch0) == list(range(len(source))) == sorted(epoch1) and epoch0 != epoch1


def test_train_iterator_resumes_from_its_state(demo_sources):
  sharding = input_pipeline.Sharding(global_batch=4, local_devices=2)
  iterator = input_pipeline.train_iterator(demo_sources['train'], sharding, seed=1)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  resumed = input_pipeline.train_iterator(demo_sources['train'], sharding, seed=1)
  resumed.set_state(state)
  for batch in expected:
    np.testing.assert_array_equal(next(resumed), batch)


def test_processes_split_each_global_batch(demo_sources):
  source = demo_sources['train']
  whole = input_pipeline.train_dataset(source, input_pipeline.Sharding(8, 1, 0, 2), seed=0)[2]
  parts = [input_pipeline.train_dataset(source, input_pipeline.Sharding(8, 2, p, 2), seed=0)[2] for p in (0, 1)]
  assert parts[0].shape == (2, 2, 256, 256, 1)
  np.testing.assert_array_equal(np.concatenate([p.reshape(4, 256, 256, 1) for p in parts]), whole.reshape(8, 256, 256, 1))


def test_eval_batches_cover_the_split_once(demo_sources):
  source = demo_sources['test']
  batches = list(input_pipeline.eval_batches(source, input_pipeline.Sharding(8, 1, 0, 2)))
  images = np.concatenate([b.reshape(-1, 256, 256, 1)[m.reshape(-1)] for b, m in batches])
  assert len(images) == len(source) == 17 and sum(m.sum() for _, m in batches) == 17
  np.testing.assert_array_equal(images[16], source[16]['image'] / np.float32(255))
  assert batches[-1][0].reshape(-1, 256, 256, 1)[~batches[-1][1].reshape(-1)].max() == 0


def test_small_image_size_averages_pixel_blocks(demo_sources):
  source = demo_sources['validate']
  full = input_pipeline.train_dataset(source, input_pipeline.Sharding(4, local_devices=2), seed=0)[0]
  small = input_pipeline.train_dataset(source, input_pipeline.Sharding(4, local_devices=2, image_size=64), seed=0)[0]
  assert small.shape == (2, 2, 64, 64, 1)
  np.testing.assert_allclose(small[1, 0, 30, 20, 0], full[1, 0, 120:124, 80:84, 0].mean(), rtol=1e-6)


def test_batch_size_must_divide_over_devices():
  with pytest.raises(UserError, match=r'config.batch_size=5: expected a positive multiple of the device count 2'):
    input_pipeline.Sharding(5, local_devices=2)
  with pytest.raises(UserError, match=r'config.image_size=100: expected a divisor of 256'):
    input_pipeline.Sharding(4, local_devices=2, image_size=100)


def test_a_data_dir_without_its_dataset_and_an_unusable_cache_dir_are_one_line(tmp_path, oasis_png_dir):
  with pytest.raises(UserError, match=r"^config.data_dir='\S+' is set, but config.dataset=demo reads no directory: "
                                      r'add --config.dataset=oasis_png \(keras_png_slices_\* folders\) or '
                                      r'--config.dataset=oasis_volumes$'):
    tfds_oasis.prepare('demo', oasis_png_dir, str(tmp_path / 'cache'))
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  with pytest.raises(UserError, match=rf'^{a_file}/cache: cannot hold the prepared dataset \(Not a directory; '
                                      r'config.cache_dir or \$OASIS_JAX_CACHE\)$'):
    tfds_oasis.prepare('oasis_png', oasis_png_dir, str(a_file / 'cache'))


def test_preparing_a_dataset_leaves_no_temporary_directories(tmp_path, monkeypatch):
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))   # where TFDS would leave its empty directory
  tfds_oasis.prepare('demo', cache_dir=str(tmp_path / 'cache'))
  assert os.listdir(scratch) == [] and tempfile.gettempdir() == str(scratch)


def test_warped_fixture_is_another_brain_sample_in_the_oasis_layout(tmp_path, cache_dir):
  """The quality-check fixture: case-disjoint splits the PNG builder reads, none of its slices a demo slice, the
  same files for the same seed and other files for another."""
  cases = {'train': 2, 'validate': 1, 'test': 1}
  counts = warped_fixture.write(str(tmp_path / 'a'), seed=3, cases=cases, slices_per_case=6)
  assert counts == {'train': 12, 'validate': 6, 'test': 6}
  files = {split: oasis_files.list_png_split(str(tmp_path / 'a'), split) for split in demo_data.SPLITS}
  case_sets = {split: {case for case, _, _ in found} for split, found in files.items()}
  assert case_sets == {'train': {1, 2}, 'validate': {3}, 'test': {4}}
  builder = tfds_oasis.prepare('oasis_png', str(tmp_path / 'a'), cache_dir)
  assert len(builder.as_data_source('train')) == 12
  demo = np.stack([image for _, _, image, _ in demo_data.demo_examples('train')]).astype(np.float32)
  for _, _, path in files['test']:
    image = np.asarray(Image.open(path)).astype(np.float32)
    assert image.shape == (256, 256) and image.max() > 100
    inside = (demo > 0) | (image > 0)
    distance = (np.abs(demo - image) * inside).sum(axis=(1, 2)) / inside.sum(axis=(1, 2))
    assert distance.min() > 10   # inside the brain, no demo slice is within 10 grey levels of it on average
  again = warped_fixture.write(str(tmp_path / 'b'), seed=3, cases=cases, slices_per_case=6)
  other = warped_fixture.write(str(tmp_path / 'c'), seed=4, cases=cases, slices_per_case=6)
  assert again == counts and other == counts
  read = lambda root: [np.asarray(Image.open(p)) for _, _, p in oasis_files.list_png_split(str(tmp_path / root), 'test')]
  assert all(np.array_equal(x, y) for x, y in zip(read('a'), read('b')))
  assert not any(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(read('a'), read('c')))
