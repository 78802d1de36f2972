"""Shared fixtures. Two CPU devices are forced before JAX is imported anywhere, so pmap is tested for real."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

from oasis_jax import demo_data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
  """One TFDS cache for the session: each dataset is prepared once and re-used, as for a user."""
  return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='session')
def oasis_png_dir(tmp_path_factory):
  """A small OASIS-layout download (keras_png_slices_* and seg masks) made of real MNI152 slices."""
  root = str(tmp_path_factory.mktemp('oasis_png'))
  demo_data.write_oasis_png_layout(root, max_per_split=40)
  return root
