"""The im2col + GEMM convolution equals XLA's convolution (values and gradients), and Conv equals flax's Conv."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oasis_jax import convolution


@pytest.mark.parametrize('size, kernel, stride, cin, cout', [
    (16, 4, 2, 1, 8), (16, 4, 2, 3, 5), (8, 3, 1, 4, 6), (9, 3, 1, 2, 3), (8, 1, 1, 4, 5), (7, 4, 2, 2, 2)])
def test_im2col_equals_xla_convolution_and_its_gradients(size, kernel, stride, cin, cout):
  x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout))
  reference = jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  got = convolution.conv(x, w, stride, 'im2col')
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
  loss = lambda impl: lambda x, w: jnp.sum(jnp.sin(convolution.conv(x, w, stride, impl)))
  for a, b in zip(jax.grad(loss('im2col'), (0, 1))(x, w), jax.grad(loss('xla'), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('impl', ['xla', 'im2col'])
def test_conv_module_is_a_drop_in_for_flax_conv(impl):
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  ours = convolution.Conv(6, (4, 4), strides=(2, 2), impl=impl)
  theirs = nn.Conv(6, (4, 4), strides=(2, 2))
  variables = theirs.init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(3), x)) == jax.tree.map(jnp.shape, variables)
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5)
