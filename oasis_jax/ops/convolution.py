"""2-D convolution in four forms that compute the same thing: XLA's convolution op, im2col + one GEMM, Winograd's
minimal filtering F(4x4, 3x3), or one GEMM to every tap's output + a shift-and-add (for few output channels).

On XLA:CPU the convolution op's gradients run far below the machine's GEMM speed, while a matrix multiply runs near
it (bench/conv_layers.py measures the forms layer by layer).
- im2col gathers the k x k shifted views of the padded input into one [N, H', W', k*k*C] array and multiplies it by
  the [k*k*C, O] kernel; its gradients are one GEMM each plus pads and slices.
- Winograd (Lavin & Gray 2016, as in cuDNN and NNPACK) cuts the image into 6x6 tiles overlapping by 2, maps each
  tile and the 3x3 kernel into a 36-point transform domain (B^T d B, G g G^T), multiplies there (36 GEMMs of
  [tiles, C] x [C, O]: 2.25 multiplies per output instead of 9) and maps back to 4x4 outputs (A^T m A). The
  transforms are adds and a few constant scales: native XLA:CPU kernels where winograd_cpu covers the layer (one
  pass over the data; XLA's fusions re-read the input once per transform point), else XLA ops; the backward pass
  is GEMMs plus the transposed transforms. fp32 results differ from the direct convolution by ~1e-5 relative
  (tests/test_convolution.py).
  A 4x4 stride-2 convolution is a 3x3 stride-1 convolution of the space-to-depth input (2x2 pixel blocks as 4C
  channels) with the 4x4 kernel spread over a 3x3 grid of blocks, so it takes the same path.
- taps, for layers with few outputs (the 64->4 sub-pixel layer that ends the decoder): one GEMM [N*H*W, C] x
  [C, k*k*O] gives every tap's contribution at every pixel, and k*k shifted slices of it are summed; the gradients
  are two GEMMs and the transposed shifts. XLA's op computed this layer's kernel gradient through a full transposed
  copy of the input.
`Conv` is a drop-in for `flax.linen.Conv` with SAME padding (same parameter names and shapes, so checkpoints do not
depend on the form).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oasis_jax.ops import winograd_cpu

def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """XLA's / TensorFlow's SAME padding (low, high) for one spatial dimension."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def pick(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, shape=None) -> str:
  """The faster form of a layer on XLA:CPU, as bench/conv_layers.py measures them (forward + backward; the table
  is in docs/performance.md): a 3x3 layer with <= 8 outputs from >= 16 inputs takes taps; a layer Winograd covers
  with >= 16 channels on both sides takes Winograd (it loses where a side is narrow, e.g. the 1->64 input layer);
  other layers with >= 64 channels on both sides take im2col; the rest XLA's op. GPU/TPU: always XLA's op."""
  if jax.default_backend() != 'cpu':   # GPU / TPU convolution libraries do their own (Winograd, implicit GEMM)
    return 'xla'
  if taps_applies(kernel_size, stride) and out_channels <= 8 and in_channels >= 16:
    return 'taps'
  if shape is not None and winograd_applies(shape, kernel_size, stride) and min(in_channels, out_channels) >= 16:
    return 'winograd'
  return 'im2col' if in_channels >= 64 and out_channels >= 64 else 'xla'


# Winograd F(4x4, 3x3) (Lavin & Gray 2016, eq. 6-8; interpolation points 0, +-1, +-2, infinity).
WINOGRAD_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
WINOGRAD_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                       [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
WINOGRAD_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                       np.float64)
TILE, POINTS = WINOGRAD_AT.shape   # 4 outputs from 6 points per dimension


def _combine(terms, coefficients):
  """sum_i coefficients[i] * terms[i], skipping zeros (so XLA sees plain adds and scales)."""
  out = None
  for c, term in zip(coefficients, terms):
    if c:
      term = term if c == 1 else term * float(c)
      out = term if out is None else out + term
  return out


def _overlapping_tiles(x, axis: int):
  """x has TILE * (t + 1) entries along `axis`; returns POINTS arrays, u-th = entries TILE * i + u for i < t (a new
  tile axis of length t in place of `axis`), cut from reshapes rather than strided slices (cheaper to transpose)."""
  t = x.shape[axis] // TILE - 1

  def blocks(start):
    part = jax.lax.slice_in_dim(x, start, start + TILE * t, axis=axis)
    return part.reshape(part.shape[:axis] + (t, TILE) + part.shape[axis + 1:])
  here, after = blocks(0), blocks(TILE)
  return [jax.lax.index_in_dim(here if u < TILE else after, u % TILE, axis + 1, keepdims=False)
          for u in range(POINTS)]


def _input_transform(x):
  """x [N, H, W, C] (H, W multiples of 4) -> B^T d B of every 6x6 tile of the SAME-padded x: 36 arrays
  [N*H/4*W/4, C], one per point (kept apart: a stacked copy costs as much as the GEMM on it)."""
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, TILE - 1), (1, TILE - 1), (0, 0)))
  rows = _overlapping_tiles(padded, 1)
  out = []
  for row in (_combine(rows, WINOGRAD_BT[i]) for i in range(POINTS)):
    columns = _overlapping_tiles(row, 2)
    out += [_combine(columns, WINOGRAD_BT[j]).reshape(-1, c) for j in range(POINTS)]
  return out


def _output_transform_impl(m, tiles):
  """A^T m A of every tile: m, 36 arrays [N*th*tw, O] (point (i, j) at 6 i + j) -> y [N, th*4, tw*4, O]."""
  n, th, tw = tiles
  m = [[m[i * POINTS + j].reshape(n, th, tw, -1) for j in range(POINTS)] for i in range(POINTS)]
  half = [[_combine([m[i][j] for j in range(POINTS)], WINOGRAD_AT[s]) for s in range(TILE)] for i in range(POINTS)]
  y = jnp.stack([jnp.stack([_combine([half[i][s] for i in range(POINTS)], WINOGRAD_AT[r]) for s in range(TILE)],
                           axis=3) for r in range(TILE)], axis=2)            # [N, th, 4, tw, 4, O]
  return y.reshape(n, th * TILE, tw * TILE, y.shape[-1])


def _output_transform_transposed(dy, tiles):
  """The transpose of _output_transform_impl: A dy A^T of every 4x4 tile of dy -> 36 arrays [N*th*tw, O], as one
  copy of dy into its 16 tile phases [16, N*th*tw*O] and one GEMM by kron(A, A)^T [36, 16]. Written out because
  autodiff's transpose of the forward's stack-and-index pattern ran ~20x slower on XLA:CPU (it made the 128->128
  layer's forward + backward 4x slower); the GEMM rather than 36 sums of phases because XLA fuses dy's producer
  (a ReLU's gradient mask, a depth-to-space transpose) into each of the 36 sums and recomputes it there."""
  n, th, tw = tiles
  o = dy.shape[-1]
  phases = dy.reshape(n, th, TILE, tw, TILE, o).transpose(2, 4, 0, 1, 3, 5).reshape(TILE * TILE, -1)
  m = jnp.asarray(np.kron(WINOGRAD_AT, WINOGRAD_AT).T, dy.dtype) @ phases
  return list(m.reshape(POINTS * POINTS, n * th * tw, o))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _output_transform(m, tiles):
  return _output_transform_impl(m, tiles)


_output_transform.defvjp(lambda m, tiles: (_output_transform_impl(m, tiles), None),
                         lambda tiles, _, dy: (_output_transform_transposed(dy, tiles),))


def winograd3x3(x, kernel, native: bool | None = None):
  """SAME 3x3 stride-1 convolution of x [N, H, W, C] (H, W multiples of 4) with kernel [3, 3, C, O], as F(4x4, 3x3).

  The tile transforms run as native XLA:CPU kernels where winograd_cpu covers the layer (native=None: where
  `winograd_cpu.usable` says so; False: never; True: always, for a caller that checked it), else as the XLA ops
  above; the 36 GEMMs are XLA's either way."""
  n, h, w, c = x.shape
  o = kernel.shape[-1]
  g = WINOGRAD_G.astype(np.float32)
  u = jnp.einsum('ai,ijco,bj->abco', g, kernel, g).reshape(POINTS * POINTS, c, o).astype(x.dtype)
  if native is None:
    native = winograd_cpu.usable(x.shape, o, x.dtype)
  if native:
    m = jnp.einsum('ptc,pco->pto', winograd_cpu.input_transform(x), u)   # one batched GEMM over the 36 points
    return winograd_cpu.output_transform(m, (n, h, w, o))
  m = [v @ u[f] for f, v in enumerate(_input_transform(x))]
  return _output_transform(m, (n, h // TILE, w // TILE))


def taps3x3(x, kernel):
  """SAME 3x3 stride-1 convolution of x [N, H, W, C] with kernel [3, 3, C, O] as one GEMM to the 9 taps' outputs
  [N, H, W, 3, 3, O] and a sum of their shifted slices: y[h, w] = sum_ij z[h + i - 1, w + j - 1, i, j]."""
  return cotangent_computed_once(_taps3x3(x, kernel))


def _taps3x3(x, kernel):
  n, h, w, c = x.shape
  o = kernel.shape[-1]
  z = (x.reshape(-1, c) @ kernel.transpose(2, 0, 1, 3).reshape(c, 9 * o)).reshape(n, h, w, 3, 3, o)
  z = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  return sum(z[:, i:i + h, j:j + w, i, j] for i in range(3) for j in range(3))


@jax.custom_vjp
def cotangent_computed_once(y):
  """The identity, whose cotangent passes through a matrix product with the identity matrix: exact, so gradients
  stay bit-identical, and a fusion boundary on XLA:CPU. The taps form's gradient reads each pixel's cotangent nine
  times (once per tap), and XLA fuses the elementwise ops that produce the cotangent into those reads: after the
  demo decoder's last layer that is the loss's gradient chain (the SSIM term's, the clip, the depth-to-space),
  evaluated nine times per pixel, 12 ms of a 70 ms demo stage-1 step. Through the product it is evaluated once."""
  return y


def _cotangent_computed_once_bwd(_, g):
  channels = g.shape[-1]
  eye = jnp.eye(channels, dtype=g.dtype)
  return (jnp.matmul(g.reshape(-1, channels), eye, precision=jax.lax.Precision.HIGHEST).reshape(g.shape),)


cotangent_computed_once.defvjp(lambda y: (y, None), _cotangent_computed_once_bwd)


def space_to_depth(x, block: int = 2):
  """[N, H, W, C] -> [N, H / b, W / b, b * b * C] (channel order: row in block, column in block, c)."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // block, block, w // block, block, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // block, w // block, block * block * c)


def strided_kernel_as_3x3(kernel):
  """A 4x4 stride-2 SAME kernel [4, 4, C, O] as the 3x3 kernel [3, 3, 4C, O] over space_to_depth blocks.

  Output i of the 4x4/2 SAME convolution reads input rows 2i-1 .. 2i+2, i.e. row 1 of block i-1, block i and row 0
  of block i+1: kernel row k sits at block 1 + floor((k-1)/2), row-in-block (k-1) mod 2; block row 0 / in-block row
  0 and block row 2 / in-block row 1 get zeros."""
  c, o = kernel.shape[2:]
  k = jnp.pad(kernel, ((1, 1), (1, 1), (0, 0), (0, 0)))                 # [6, 6, C, O], index = k + 1
  k = k.reshape(3, 2, 3, 2, c, o).transpose(0, 2, 1, 3, 4, 5)         # [block r, block c, in r, in c, C, O]
  return k.reshape(3, 3, 4 * c, o)


def winograd_applies(shape, kernel_size: int, stride: int) -> bool:
  """Whether the Winograd form covers this layer (3x3/1 on sides that are multiples of 4, or 4x4/2 on multiples
  of 8)."""
  h, w = shape[1], shape[2]
  if kernel_size == 3 and stride == 1:
    return h % TILE == 0 and w % TILE == 0
  if kernel_size == 4 and stride == 2:
    return h % (2 * TILE) == 0 and w % (2 * TILE) == 0
  return False


def taps_applies(kernel_size: int, stride: int) -> bool:
  """Whether the taps form covers this layer (3x3 stride 1)."""
  return kernel_size == 3 and stride == 1


def conv(x, kernel, stride: int = 1, impl: str = 'xla'):
  """SAME-padded convolution of x [N, H, W, C] with kernel [k, k, C, O] at the given stride; impl is one of IMPLS
  ('auto': per layer, by `pick`; 'winograd' and 'taps' fall back to XLA's op on layers they do not cover)."""
  k = kernel.shape[0]
  if impl == 'auto':
    impl = pick(kernel.shape[2], kernel.shape[3], k, stride, x.shape)
    if impl == 'winograd' and x.dtype != jnp.float32:   # bf16 would lose ~3 bits in the transforms (x8, /24)
      impl = 'xla'
  if k == 1 and stride == 1:   # a 1x1 convolution is a matrix multiply in either form; 2-D so that its
    return (x.reshape(-1, x.shape[-1]) @ kernel[0, 0]).reshape(x.shape[:-1] + kernel.shape[-1:])  # grads are too
  if impl == 'winograd' and not winograd_applies(x.shape, k, stride):
    impl = 'xla'
  if impl == 'taps' and not taps_applies(k, stride):
    impl = 'xla'
  if impl == 'taps':
    return taps3x3(x, kernel)
  if impl == 'winograd':
    if stride == 2:
      return winograd3x3(space_to_depth(x), strided_kernel_as_3x3(kernel))
    return winograd3x3(x, kernel)
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
