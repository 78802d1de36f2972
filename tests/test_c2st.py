"""The classifier two-sample test: its features against NumPy, and its verdicts on real demo slices."""
import numpy as np
import pytest
from scipy import ndimage

from oasis_jax import c2st
from oasis_jax.data import input_pipeline, tfds_oasis


@pytest.fixture(scope='module')
def real_slices(cache_dir):
  """The demo's 428 real training slices, [N, 256, 256, 1] in [0, 1], and their groups of augmented copies."""
  source = tfds_oasis.prepare('demo', cache_dir=cache_dir).as_data_source('train')
  return input_pipeline.load_images(source, 256), input_pipeline.load_groups(source, 'demo')


def test_features_layout_and_intensity_parts_match_numpy():
  rng = np.random.default_rng(0)
  images = rng.random((3, 64, 64, 1)).astype(np.float32) * (rng.random((3, 64, 64, 1)) > 0.3)
  features = c2st.features(images)
  np.testing.assert_allclose(features[:, :256], images[..., 0].reshape(3, 16, 4, 16, 4).mean(axis=(2, 4))
                             .reshape(3, 256), rtol=1e-5, atol=1e-6)
  edges = c2st.INTENSITY_BINS
  for i, image in enumerate(images[..., 0]):
    brain = image[image > edges[0]]
    expected = np.histogram(np.clip(brain, edges[0], edges[-1]), bins=edges)[0] / brain.size
    np.testing.assert_allclose(features[i, -16:], expected, atol=1e-6)


def test_accuracy_is_one_for_separable_sets_and_near_half_for_one_distribution():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(200, 10)), rng.normal(size=(200, 10))
  assert 0.4 <= c2st.accuracy(a, b)['accuracy'] <= 0.6
  b[:, 3] += 10.0   # the classes lie 5 standard deviations either side of the best boundary
  assert c2st.accuracy(a, b)['accuracy'] == 1.0


def test_real_vs_real_is_near_one_half_and_blur_is_told_apart(real_slices):
  slices, groups = real_slices
  assert len(np.unique(groups)) == 107 and np.all(np.bincount(groups)[np.unique(groups)] == 4)   # 4 copies each
  real = c2st.features(slices)
  baseline = c2st.real_vs_real(real, groups)
  assert baseline["images"] == 428 and abs(baseline['accuracy'] - 0.5) < 0.08, baseline
  for sigma in (1.0, 2.0):
    blurred = ndimage.gaussian_filter(slices, sigma=(0, sigma, sigma, 0))
    result = c2st.accuracy(c2st.features(blurred), real, groups_a=groups, groups_b=groups)
    assert result['accuracy'] > 0.9, (sigma, result)
