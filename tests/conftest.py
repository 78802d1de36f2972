"""Shared fixtures. Two CPU devices are forced before JAX is imported anywhere, so pmap is tested for real."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from oasis_jax.data import demo_data  # noqa: E402

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


def _run_cli(*args, check=True):
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f'{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}')
  return result


@pytest.fixture(scope='session')
def run_cli():
  """run_cli('train_vqvae.py', '--flag', ..., check=True): runs a real CLI of the project in a fresh Python process
  from the repository root; returns the CompletedProcess (stdout, stderr, returncode)."""
  return _run_cli


def _edit_saved_config(workdir, **fields):
  """Changes fields of the config a training run saved in WORKDIR/config.json (to model a run made otherwise)."""
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  saved['config'].update(fields)
  with open(path, 'w') as f:
    json.dump(saved, f)


@pytest.fixture(scope='session')
def edit_saved_config():
  """edit_saved_config(workdir, field=value, ...): rewrites those fields of WORKDIR/config.json."""
  return _edit_saved_config


@pytest.fixture(scope='session')
def tiny_stage1(tmp_path_factory, cache_dir, run_cli):
  """A tiny stage-1 run trained in two parts (20 steps, then resumed to 30) and an uninterrupted 30-step run."""
  base = tmp_path_factory.mktemp('stage1')
  common = ['train_vqvae.py', '--config=configs/vqvae.py:tiny', f'--config.cache_dir={cache_dir}']
  first = run_cli(*common, f'--workdir={base}/resumed', '--config.num_train_steps=20')
  second = run_cli(*common, f'--workdir={base}/resumed', '--config.num_train_steps=30')
  whole = run_cli(*common, f'--workdir={base}/whole', '--config.num_train_steps=30')
  return {'resumed': str(base / 'resumed'), 'whole': str(base / 'whole'), 'logs': (first, second, whole)}
