"""The im2col, Winograd and taps convolutions equal XLA's convolution (values and gradients, against a float64
reference for Winograd and taps), with and without the native Winograd kernels, `auto` picks as documented, and Conv
equals flax's Conv."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oasis_jax.ops import convolution, winograd_cpu


def sin_loss_grads(stride: int, impl: str):
  """Jitted gradients of sum(sin(conv(x, w))) w.r.t. x and w: a loss whose gradients reach every output."""
  return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(convolution.conv(x, w, stride, impl))), (0, 1)))


@pytest.mark.parametrize('size, kernel, stride, cin, cout', [
    (16, 4, 2, 1, 8), (16, 4, 2, 3, 5), (8, 3, 1, 4, 6), (9, 3, 1, 2, 3), (8, 1, 1, 4, 5), (7, 4, 2, 2, 2)])
def test_im2col_equals_xla_convolution_and_its_gradients(size, kernel, stride, cin, cout):
  x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout))
  reference = jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  got = jax.jit(convolution.conv, static_argnums=(2, 3))(x, w, stride, 'im2col')
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
  for a, b in zip(sin_loss_grads(stride, 'im2col')(x, w), sin_loss_grads(stride, 'xla')(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def direct_convolution_float64(x, w, stride):
  """SAME convolution by explicit loops over the kernel taps in float64 NumPy: the reference for Winograd."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  n, h, width, _ = x.shape
  k = w.shape[0]
  (top, bottom), (left, right) = convolution.same_padding(h, k, stride), convolution.same_padding(width, k, stride)
  padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = -(-h // stride), -(-width // stride)
  out = np.zeros((n, out_h, out_w, w.shape[3]))
  for i in range(k):
    for j in range(k):
      view = padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
      out += view @ w[i, j]
  return out


@pytest.mark.parametrize('size, kernel, stride, cin, cout', [
    (8, 3, 1, 3, 5), (16, 3, 1, 4, 2), (12, 3, 1, 2, 3), (16, 4, 2, 3, 5), (8, 4, 2, 1, 4), (24, 4, 2, 2, 3)])
def test_winograd_equals_direct_convolution_and_its_gradients(size, kernel, stride, cin, cout):
  assert convolution.winograd_applies((2, size, size, cin), kernel, stride)
  x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin)
  reference = direct_convolution_float64(x, w, stride)
  got = jax.jit(convolution.conv, static_argnums=(2, 3))(x, w, stride, 'winograd')
  assert got.shape == reference.shape
  # F(4x4, 3x3)'s transforms scale by up to 8 and 1/24: fp32 error ~1e-6 of unit-scale outputs (direct: ~1e-7).
  np.testing.assert_allclose(got, reference, rtol=0, atol=2e-5)
  # Gradients: of sum(sin(conv)) w.r.t. input and kernel, against XLA's convolution.
  for a, b in zip(sin_loss_grads(stride, 'winograd')(x, w), sin_loss_grads(stride, 'xla')(x, w)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize('size, cin, cout', [(8, 16, 4), (6, 5, 1), (7, 3, 8)])
def test_taps_equals_direct_convolution_and_its_gradients(size, cin, cout):
  x = jax.random.normal(jax.random.key(10), (2, size, size, cin))
  w = jax.random.normal(jax.random.key(11), (3, 3, cin, cout)) / np.sqrt(9 * cin)
  got = jax.jit(convolution.conv, static_argnums=(2, 3))(x, w, 1, 'taps')
  np.testing.assert_allclose(got, direct_convolution_float64(x, w, 1), rtol=0, atol=1e-5)
  for a, b in zip(sin_loss_grads(1, 'taps')(x, w), sin_loss_grads(1, 'xla')(x, w)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  w4 = jax.random.normal(jax.random.key(12), (4, 4, cin, cout))    # not 3x3/1: XLA's op
  np.testing.assert_array_equal(convolution.conv(x, w4, 2, 'taps'), convolution.conv(x, w4, 2, 'xla'))


def test_taps_gradients_are_bit_identical_through_the_fusion_boundary():
  """taps3x3 passes its cotangent through a product with the identity (so that XLA:CPU computes it once): exact."""
  x = jax.random.normal(jax.random.key(13), (2, 12, 12, 16))
  w = jax.random.normal(jax.random.key(14), (3, 3, 16, 4)) / 12
  target = jax.random.uniform(jax.random.key(15), (2, 12, 12, 4))

  def loss(conv):   # an elementwise chain before the layer's cotangent, as the SSIM term's
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.clip(conv(x, w), 0, 1) / (target + 0.1) ** 2), (0, 1)))
  for a, b in zip(loss(convolution.taps3x3)(x, w), loss(convolution._taps3x3)(x, w)):
    assert jnp.any(b != 0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('kernel, stride', [(3, 1), (4, 2)])
def test_winograd_second_derivatives_match_for_the_r1_penalty(kernel, stride):
  """Stage 2's R1 penalty differentiates a gradient: through Winograd's custom transpose that must match XLA's."""
  x = jax.random.normal(jax.random.key(8), (2, 8, 8, 3))
  w = jax.random.normal(jax.random.key(9), (kernel, kernel, 3, 4)) / np.sqrt(kernel * kernel * 3)

  def r1(impl):
    def penalty(w):
      grad_x = jax.grad(lambda x: jnp.sum(jnp.tanh(convolution.conv(x, w, stride, impl))))(x)
      return jnp.sum(grad_x ** 2)
    return jax.jit(jax.value_and_grad(penalty))(w)
  (value, grad), (reference_value, reference_grad) = r1('winograd'), r1('xla')
  np.testing.assert_allclose(value, reference_value, rtol=1e-5)
  np.testing.assert_allclose(grad, reference_grad, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(reference_grad))))


def test_native_transforms_equal_the_xla_transforms_and_their_transposes():
  """winograd_cpu's kernels against convolution.py's XLA transforms (and the autodiff transposes of those), on a
  non-square image with two channel blocks, including the SAME padding at every border."""
  assert winograd_cpu.usable((2, 8, 12, 32), 16, jnp.float32)   # the library builds here: the native path is real
  shape, tiles = (2, 8, 12, 32), (2, 2, 3)
  x = jax.random.normal(jax.random.key(20), shape)
  v = jax.random.normal(jax.random.key(21), (36, 12, 32))
  xla_input = lambda x: jnp.stack(convolution._input_transform(x))
  xla_output = lambda m: convolution._output_transform_impl(list(m), tiles)
  transposed = lambda f: jax.jit(lambda primal, cotangent: jax.vjp(f, primal)[1](cotangent)[0])
  np.testing.assert_allclose(winograd_cpu.input_transform(x), jax.jit(xla_input)(x), rtol=0, atol=1e-5)
  np.testing.assert_allclose(winograd_cpu.output_transform(v, shape), jax.jit(xla_output)(v), rtol=0, atol=1e-4)
  np.testing.assert_allclose(winograd_cpu.input_transform_transposed(v, shape), transposed(xla_input)(x, v),
                             rtol=0, atol=1e-4)
  np.testing.assert_allclose(winograd_cpu.output_transform_transposed(x), transposed(xla_output)(v, x),
                             rtol=0, atol=1e-4)
  # Their own VJPs are the transposes: <T x, v> = <x, T^T v> through jax.vjp.
  _, vjp = jax.vjp(winograd_cpu.input_transform, x)
  np.testing.assert_allclose(jnp.vdot(winograd_cpu.input_transform(x), v), jnp.vdot(x, vjp(v)[0]), rtol=1e-5)


@pytest.mark.parametrize('shape, cout', [((2, 8, 8, 16), 32), ((1, 12, 4, 32), 16), ((2, 4, 8, 48), 16)])
def test_native_winograd_equals_direct_convolution_and_its_gradients(shape, cout):
  assert winograd_cpu.usable(shape, cout, jnp.float32)
  x = jax.random.normal(jax.random.key(22), shape)
  w = jax.random.normal(jax.random.key(23), (3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1])
  np.testing.assert_allclose(jax.jit(convolution.winograd3x3)(x, w), direct_convolution_float64(x, w, 1), rtol=0,
                             atol=2e-5)
  loss = lambda native: lambda x, w: jnp.sum(jnp.sin(convolution.winograd3x3(x, w, native)))
  reference = sin_loss_grads(1, 'xla')(x, w)
  for native in (None, False):
    for a, b in zip(jax.jit(jax.grad(loss(native), (0, 1)))(x, w), reference):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_native_winograd_second_derivatives_for_the_r1_penalty():
  x = jax.random.normal(jax.random.key(24), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(25), (3, 3, 16, 16)) / 12

  def r1(convolve):
    def penalty(w):
      return jnp.sum(jax.grad(lambda x: jnp.sum(jnp.tanh(convolve(x, w))))(x) ** 2)
    return jax.jit(jax.value_and_grad(penalty))(w)
  (value, grad) = r1(convolution.winograd3x3)
  (reference_value, reference_grad) = r1(lambda x, w: convolution.conv(x, w, 1, 'xla'))
  np.testing.assert_allclose(value, reference_value, rtol=1e-5)
  np.testing.assert_allclose(grad, reference_grad, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(reference_grad))))


def test_native_kernels_build_in_a_fresh_cache_and_fall_back_without_a_compiler(tmp_path):
  assert not winograd_cpu.usable((2, 8, 8, 8), 16, jnp.float32)      # 8 channels: not a multiple of 16
  assert not winograd_cpu.usable((2, 8, 8, 16), 16, jnp.bfloat16)
  with winograd_cpu.turned_off():
    assert not winograd_cpu.usable((2, 8, 8, 16), 16, jnp.float32)
  # Fresh processes with empty caches: the real compiler builds the library there; a missing one gives one warning
  # and the XLA transforms; the convolution is the same either way.
  code = ('import jax, numpy as np; from oasis_jax.ops import convolution, winograd_cpu; '
          'x = np.ones((1, 8, 8, 16), np.float32); w = np.ones((3, 3, 16, 16), np.float32) / 100; '
          'print(winograd_cpu.usable(x.shape, 16, np.float32), float(convolution.conv(x, w, 1, "winograd").sum()))')
  expected = float(jnp.sum(convolution.conv(jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 16)) / 100, 1, 'xla')))
  for compiler, built in ((os.environ.get('CXX', 'g++'), True), (str(tmp_path / 'no-such-compiler'), False)):
    cache = tmp_path / f'cache-{built}'
    environment = dict(os.environ, CXX=compiler, OASIS_JAX_CACHE=str(cache))
    result = subprocess.run([sys.executable, '-c', code], env=environment, capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    usable, total = result.stdout.split()
    assert usable == str(built) and abs(float(total) - expected) < 1e-3 * expected
    assert len(list((cache / 'kernels').glob('winograd_cpu-*.so'))) == int(built)
    assert ('Native Winograd kernels unavailable' in result.stderr) == (not built)


def test_winograd_falls_back_where_it_does_not_apply_and_auto_picks_per_layer():
  x = jax.random.normal(jax.random.key(4), (1, 10, 10, 3))       # 10 is not a multiple of 4
  w = jax.random.normal(jax.random.key(5), (3, 3, 3, 2))
  assert not convolution.winograd_applies(x.shape, 3, 1)
  np.testing.assert_allclose(convolution.conv(x, w, 1, 'winograd'), convolution.conv(x, w, 1, 'xla'), rtol=1e-6,
                             atol=1e-6)
  assert convolution.pick(128, 128, 3, 1, (32, 64, 64, 128)) == 'winograd'
  assert convolution.pick(64, 128, 4, 2, (32, 128, 128, 64)) == 'winograd'
  assert convolution.pick(1, 64, 4, 2, (32, 256, 256, 1)) == 'xla'      # narrow sides: XLA's op
  assert convolution.pick(64, 4, 3, 1, (32, 128, 128, 64)) == 'taps'     # few outputs: one GEMM to all taps
  assert convolution.pick(4, 4, 3, 1, (32, 128, 128, 4)) == 'xla'
  assert convolution.pick(128, 128, 3, 1, (32, 66, 66, 128)) == 'im2col'  # wide, but Winograd does not cover it


def test_strided_kernel_as_3x3_over_space_to_depth_is_the_strided_convolution():
  x = jax.random.normal(jax.random.key(6), (2, 8, 8, 3))
  w = jax.random.normal(jax.random.key(7), (4, 4, 3, 5))
  via_blocks = jax.lax.conv_general_dilated(convolution.space_to_depth(x), convolution.strided_kernel_as_3x3(w),
                                            (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                            precision='highest')
  np.testing.assert_allclose(via_blocks, direct_convolution_float64(x, w, 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize('impl', ['xla', 'im2col', 'winograd'])
def test_conv_module_is_a_drop_in_for_flax_conv(impl):
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  ours = convolution.Conv(6, (4, 4), strides=(2, 2), impl=impl)
  theirs = nn.Conv(6, (4, 4), strides=(2, 2))
  variables = theirs.init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(3), x)) == jax.tree.map(jnp.shape, variables)
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5)
