"""Layer by layer: XLA's convolution vs the same convolution as im2col + one GEMM, forward + backward, jitted.

    python bench/conv_layers.py [--batch=32] [--rounds=5]

The layers are those of the seed's stage-1 model at 256x256 (batch 32). For each: median seconds of a jitted
value_and_grad (w.r.t. input and kernel) of sum(conv(x, w)^2), both forms alternating, GFLOP/s of the forward
FLOPs x3, and the ratio. Prints a table and a final JSON line.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from oasis_jax import convolution  # noqa: E402

# (name, input size, in channels, out channels, kernel, stride)
LAYERS = [
    ('enc conv1 4x4/2 1->64', 256, 1, 64, 4, 2),
    ('enc conv2 4x4/2 64->128', 128, 64, 128, 4, 2),
    ('enc conv3 3x3 128->128', 64, 128, 128, 3, 1),
    ('res 3x3 128->32', 64, 128, 32, 3, 1),
    ('res 1x1 32->128', 64, 32, 128, 1, 1),
    ('dec subpixel 3x3 128->256', 64, 128, 256, 3, 1),
    ('dec subpixel 3x3 64->4', 128, 64, 4, 3, 1),
]


def timed(fn, *args, rounds):
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - start)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()
  print(f'{"layer":28} {"xla s":>8} {"im2col s":>9} {"xla GF/s":>9} {"im2col GF/s":>11} {"speed-up":>8}')
  rows = []
  for name, size, cin, cout, k, stride in LAYERS:
    x = jax.random.normal(jax.random.key(0), (args.batch, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) / (k * k * cin) ** 0.5
    flops = 3 * 2 * args.batch * (size // stride) ** 2 * k * k * cin * cout

    def make(impl):
      return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(convolution.conv(x, w, stride, impl) ** 2),
                                        argnums=(0, 1)))
    xla_fn, im2col_fn = make('xla'), make('im2col')
    times = {'xla': [], 'im2col': []}
    for _ in range(args.rounds):
      times['xla'] += timed(xla_fn, x, w, rounds=1)
      times['im2col'] += timed(im2col_fn, x, w, rounds=1)
    a, b = statistics.median(times['xla']), statistics.median(times['im2col'])
    rows.append({'layer': name, 'xla_s': a, 'im2col_s': b, 'speedup': a / b})
    print(f'{name:28} {a:8.3f} {b:9.3f} {flops / a / 1e9:9.1f} {flops / b / 1e9:11.1f} {a / b:8.2f}  '
          f'auto: {convolution.pick(cin, cout)}', flush=True)
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
