"""Shared fixtures. Two CPU devices are forced before JAX is imported anywhere, so pmap is tested for real."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import fcntl  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

from oasis_jax import cli  # noqa: E402
from oasis_jax.data import demo_data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SESSION_CACHE = 'OASIS_JAX_TEST_SESSION_CACHE'
OWNS_CACHE = pytest.StashKey[bool]()


def pytest_configure(config):
  """One fresh oasis_jax cache per test session ($OASIS_JAX_CACHE: JAX's compilation cache, the native kernels),
  made by the controlling process before it starts the xdist workers, which inherit it, as does every CLI a test
  runs: a program compiled once in the session is not compiled again, and the user's cache is neither read nor
  written."""
  if SESSION_CACHE not in os.environ:
    os.environ[SESSION_CACHE] = os.environ['OASIS_JAX_CACHE'] = tempfile.mkdtemp(prefix='oasis_jax_tests_')
    config.stash[OWNS_CACHE] = True
  cli.enable_compilation_cache()


# The longest test files first: `make test` hands whole files to its 2 workers (--dist loadfile), and a long file
# started last would leave one worker idle. test_soak.py builds the shared tiny chain while the other worker runs
# test_convolution.py, which does not need it.
LONGEST_FIRST = ('test_soak.py', 'test_convolution.py', 'test_gan.py', 'test_vqvae.py', 'test_reliability.py',
                 'test_multiprocess.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the order within a file is kept


def pytest_unconfigure(config):
  if config.stash.get(OWNS_CACHE, False):
    shutil.rmtree(os.environ.pop(SESSION_CACHE), ignore_errors=True)



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


def _run_cli(*args, check=True, env=None):
  result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f'{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}')
  return result


@pytest.fixture(scope='session')
def run_cli():
  """run_cli('train_vqvae.py', '--flag', ..., check=True, env=None): runs a real CLI of the project in a fresh Python
  process from the repository root (env: its environment, default this one's); returns the CompletedProcess (stdout,
  stderr, returncode)."""
  return _run_cli


def _edit_saved_config(workdir, drop=(), **fields):
  """Changes fields of the config a training run saved in WORKDIR/config.json, and removes those named in `drop`
  (to model a run made otherwise, or before a field existed)."""
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  saved['config'].update(fields)
  for field in drop:
    del saved['config'][field]
  with open(path, 'w') as f:
    json.dump(saved, f)


@pytest.fixture(scope='session')
def edit_saved_config():
  """edit_saved_config(workdir, drop=(field, ...), field=value, ...): rewrites WORKDIR/config.json."""
  return _edit_saved_config


@pytest.fixture(scope='session')
def tiny_chain(tmp_path_factory, worker_id, cache_dir, run_cli):
  """The tiny recipes' chain, trained once per session by real CLIs and shared by the xdist workers (the first to
  need it builds it under a file lock): {'stage1': a 30-step stage-1 workdir, 'gan': a 20-step stage-2 workdir on it,
  'stage1_log' / 'gan_log': their stdout}. Tests that write into a run work on a copy."""
  root = tmp_path_factory.getbasetemp()
  root = root.parent if worker_id != 'master' else root   # the session's directory, shared by its workers
  chain = root / 'tiny_chain'
  with open(root / 'tiny_chain.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (chain / 'done').exists():
      shutil.rmtree(chain, ignore_errors=True)
      stage1 = run_cli('train_vqvae.py', '--config=configs/vqvae.py:tiny', f'--workdir={chain}/stage1',
                       f'--config.cache_dir={cache_dir}', '--config.num_train_steps=30')
      gan = run_cli('train_gan.py', '--config=configs/gan.py:tiny', f'--workdir={chain}/gan',
                    f'--config.vqvae_workdir={chain}/stage1')
      (chain / 'stage1.log').write_text(stage1.stdout)
      (chain / 'gan.log').write_text(gan.stdout)
      (chain / 'done').touch()
  return {'stage1': str(chain / 'stage1'), 'gan': str(chain / 'gan'),
          'stage1_log': (chain / 'stage1.log').read_text(), 'gan_log': (chain / 'gan.log').read_text()}
