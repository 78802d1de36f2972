"""Winograd F(4x4, 3x3)'s tile transforms as native XLA:CPU kernels (winograd_cpu.cc, called through the XLA FFI).

XLA fuses each of the 36 points of the input transform into its own loop over the whole input, so a layer reads
its input 36 times; the kernels make one pass, a tile of 16 channels at a time (docs/performance.md compares the
train steps with and without them).

The four ops are linear and each pair is the other's transpose, declared as custom VJPs, so reverse mode works to
any order (stage 2's R1 penalty differentiates a gradient); forward mode (jax.jvp) does not.

The library is compiled on first use with the system's C++ compiler ($CXX, else g++; a few seconds) into
CACHE/kernels/ (CACHE: $OASIS_JAX_CACHE or ~/.cache/oasis_jax), keyed by the source, the compiler flags, the JAX
version and the CPU, and loaded from there afterwards. Without a compiler, or with OASIS_JAX_NATIVE=0, `usable`
says no and convolution.py computes the same transforms in XLA (one warning is logged).
"""
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from absl import logging

from oasis_jax.paths import default_cache_dir

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'winograd_cpu.cc')
TARGETS = ('WinogradInput', 'WinogradInputT', 'WinogradOutput', 'WinogradOutputT')
FLAG_SETS = (['-O3', '-march=native'], ['-O3'])   # the second where the compiler has no -march=native
LANES = 16   # channels per vector block in the kernels: layers need multiples of it


def _cpu_id() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith('flags')), platform.processor())
  except OSError:
    return platform.machine() + platform.processor()


def _build(directory: str) -> str:
  """Compiles the library into `directory` unless it is there already; returns its path. Raises on failure."""
  compiler = os.environ.get('CXX', 'g++')
  with open(SOURCE, 'rb') as f:
    source = f.read()
  errors = []
  for flags in FLAG_SETS:
    key = hashlib.sha1(b'\0'.join([source, ' '.join([compiler] + flags).encode(), jax.__version__.encode(),
                                   _cpu_id().encode()])).hexdigest()[:16]
    path = os.path.join(directory, f'winograd_cpu-{key}.so')
    if os.path.exists(path):
      return path
    os.makedirs(directory, exist_ok=True)
    fd, scratch = tempfile.mkstemp(suffix='.so', dir=directory)
    os.close(fd)
    command = [compiler, *flags, '-std=c++17', '-shared', '-fPIC', '-I', jax.ffi.include_dir(), SOURCE, '-o', scratch]
    logging.info('Building the native Winograd kernels (once per machine): %s', ' '.join(command))
    try:
      result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:        # no compiler at all
      os.remove(scratch)
      raise RuntimeError(f'{compiler}: {error}') from None
    if result.returncode == 0:
      os.replace(scratch, path)     # atomic: a concurrent process sees no library or a whole one
      return path
    os.remove(scratch)
    errors.append(result.stderr.strip().splitlines()[-1:] or ['failed'])
  raise RuntimeError(f'{compiler} failed: {errors}')


@functools.lru_cache(maxsize=None)
def _registered() -> bool:
  """Builds (if needed), loads and registers the kernels once per process; False (with a warning) if it cannot."""
  if os.environ.get('OASIS_JAX_NATIVE', '1') == '0':
    return False
  try:
    library = ctypes.cdll.LoadLibrary(_build(os.path.join(default_cache_dir(), 'kernels')))
  except (RuntimeError, OSError) as error:
    logging.warning('Native Winograd kernels unavailable (%s); using the XLA transforms instead.', error)
    return False
  for name in TARGETS:
    jax.ffi.register_ffi_target(f'oasis_{name}', jax.ffi.pycapsule(getattr(library, name)), platform='cpu')
  return True


_off = []   # non-empty inside `turned_off()`


@contextlib.contextmanager
def turned_off():
  """Programs traced inside use the XLA transforms (benchmarks compare the two forms in one process)."""
  _off.append(True)
  try:
    yield
  finally:
    _off.pop()


def usable(shape, out_channels: int, dtype) -> bool:
  """Whether the kernels cover a 3x3 layer on input `shape` [N, H, W, C] here: XLA:CPU, float32, H and W multiples
  of 4, both channel counts multiples of 16, and the library built."""
  n, h, w, c = shape
  return (not _off and jax.default_backend() == 'cpu' and dtype == jnp.float32 and h % 4 == 0 and w % 4 == 0
          and c % LANES == 0 and out_channels % LANES == 0 and _registered())


def _call(name: str, result_shape, operand):
  return jax.ffi.ffi_call(f'oasis_{name}', jax.ShapeDtypeStruct(result_shape, operand.dtype))(operand)


def _points_shape(image_shape):
  n, h, w, c = image_shape
  return 36, n * (h // 4) * (w // 4), c


def input_transform(x):
  """x [N, H, W, C] -> B^T d B of every 6x6 tile of the SAME-padded x, [36, T, C] (T = N * H/4 * W/4)."""
  return _input(x, x.shape)


def input_transform_transposed(v, image_shape):
  """The transpose of input_transform: v [36, T, C] -> [N, H, W, C] (image_shape)."""
  return _input_t(v, tuple(image_shape))


def output_transform(m, image_shape):
  """m [36, T, O] -> A^T m A of every tile, [N, H, W, O] (image_shape)."""
  return _output(m, tuple(image_shape))


def output_transform_transposed(y):
  """The transpose of output_transform: y [N, H, W, O] -> [36, T, O]."""
  return _output_t(y, y.shape)


def _linear(name: str, image_to_points: bool):
  """One kernel as a linear function f(operand, image_shape), its VJP set below to the transposed kernel."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
  def f(operand, image_shape):
    return _call(name, _points_shape(image_shape) if image_to_points else image_shape, operand)
  return f


_input, _input_t = _linear('WinogradInput', True), _linear('WinogradInputT', False)
_output, _output_t = _linear('WinogradOutput', False), _linear('WinogradOutputT', True)
for _f, _transposed in ((_input, _input_t), (_input_t, _input), (_output, _output_t), (_output_t, _output)):
  _f.defvjp(lambda operand, shape, f=_f: (f(operand, shape), None),
            lambda shape, _, cotangent, t=_transposed: (t(cotangent, shape),))
