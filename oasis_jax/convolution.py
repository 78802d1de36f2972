"""2-D convolution in two forms that compute the same thing: XLA's convolution op, or im2col + one GEMM.

On XLA:CPU the convolution op's gradients run far below the machine's GEMM speed, while a matrix multiply runs near
it (bench/conv_layers.py measures both, layer by layer). The im2col form gathers the k x k shifted views of the
padded input into one [N, H', W', k*k*C] array and multiplies it by the [k*k*C, O] kernel; its gradients are one
GEMM each plus pads and slices. `Conv` is a drop-in for `flax.linen.Conv` with SAME padding (same parameter names
and shapes, so checkpoints do not depend on the form).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """XLA's / TensorFlow's SAME padding (low, high) for one spatial dimension."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def pick(in_channels: int, out_channels: int) -> str:
  """The faster form on XLA:CPU by bench/conv_layers.py (2-core CPU, seed layers at batch 32): im2col wins
  1.4-2x where both sides are wide (64->128 4x4/2, 128->128 3x3, 128->256 3x3) and loses 1.6-2.8x on narrow
  layers (1->64, 128->32, 64->4), where its patch copies outweigh the GEMM. The demo's 32-wide layers ran slower
  with im2col too (bench/train_step.py), hence both sides >= 64."""
  return 'im2col' if in_channels >= 64 and out_channels >= 64 else 'xla'


def conv(x, kernel, stride: int = 1, impl: str = 'xla'):
  """SAME-padded convolution of x [N, H, W, C] with kernel [k, k, C, O] at the given stride; impl is 'xla',
  'im2col' or 'auto' (per layer, by `pick`)."""
  k = kernel.shape[0]
  if impl == 'auto':
    impl = pick(kernel.shape[2], kernel.shape[3])
  if k == 1 and stride == 1:   # a 1x1 convolution is a matrix multiply in either form
    return x @ kernel[0, 0]
  if impl == 'xla':
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  n, h, w, c = x.shape
  (top, bottom), (left, right) = same_padding(h, k, stride), same_padding(w, k, stride)
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = -(-h // stride), -(-w // stride)
  views = [padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
           for i in range(k) for j in range(k)]
  patches = jnp.concatenate(views, axis=-1)                     # [N, H', W', k*k*C], (i, j, c) order = HWIO
  return patches @ kernel.reshape(k * k * c, -1)


class Conv(nn.Module):
  """flax.linen.Conv(features, (k, k), strides=(s, s), padding='SAME') with a choice of form (`impl`)."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        self.kernel_size + (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    y = conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides[0], self.impl)
    return y + bias.astype(self.dtype)
