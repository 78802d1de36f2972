"""reductions.argmin and argmax equal NumPy's (the first index among ties) on random, tied, tiny, huge and infinite
rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oasis_jax.models import vqvae
from oasis_jax.ops import reductions


def rows():
  rng = np.random.default_rng(0)
  yield rng.normal(size=(300, 37)).astype(np.float32)
  yield np.round(rng.normal(size=(300, 64)) * 2).astype(np.float32) / 2      # many exact ties per row
  yield np.zeros((5, 9), np.float32)                                          # all tied: index 0
  yield rng.normal(size=(50, 16)).astype(np.float32) * 1e-30                  # differences far below 1
  near = np.full((4, 16), 1e4, np.float32)
  near[np.arange(4), [3, 0, 15, 8]] = np.nextafter(np.float32(1e4), np.float32(0))   # one ulp apart
  yield near
  big = rng.normal(size=(50, 16)).astype(np.float32) * 1e30
  big[::3, 5] = np.inf
  yield big


@pytest.mark.parametrize('x', list(rows()))
def test_argmin_is_numpys_first_index(x):
  got = jax.jit(reductions.argmin)(x)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argmin(x, axis=-1))
  np.testing.assert_array_equal(reductions.argmin(x.reshape(-1, 1, x.shape[-1]))[:, 0], np.argmin(x, axis=-1))


@pytest.mark.parametrize('x', list(rows()))
def test_argmax_is_numpys_first_index(x):
  x = -x     # ties stay ties; the infinite entries become -inf, which argmax handles exactly
  got = jax.jit(reductions.argmax)(x)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_nearest_codes_takes_the_first_of_equal_codes():
  """Codes never assigned keep equal (zero) vectors under the EMA update: a tie that must resolve as argmin does."""
  codebook = np.zeros((8, 4), np.float32)
  codebook[5] = 1.0
  vectors = np.array([[0.1, 0, 0, 0], [1, 1, 1, 0.9], [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(vqvae.nearest_codes(vectors, codebook), [0, 5, 0])
