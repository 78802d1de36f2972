"""Layer by layer: XLA's convolution vs the same convolution as im2col + one GEMM, as Winograd F(4x4, 3x3) and as
one GEMM to every tap's output + a shift-and-add (taps), forward + backward, jitted. `winograd` uses the native
tile-transform kernels (oasis_jax/winograd_cpu.py) where they apply; `winograd+xla_transforms` is the same without.

    python -m bench.conv_layers [--recipe=seed|demo] [--batch=N] [--rounds=5]
                                [--impls=xla,im2col,winograd,winograd+xla_transforms,taps]

The layers are those of the seed's stage-1 model at 256x256 (batch 32), or of the demo recipe (batch 8). For each: median seconds of a jitted
value_and_grad (w.r.t. input and kernel) of sum(conv(x, w)^2), the forms alternating, the direct convolution's
GFLOP/s (forward FLOPs x3 / time; Winograd does fewer multiplies, so its figure can pass the GEMM peak), the speed-up
of each form over XLA's, and what `convolution.pick` chooses. Prints a table and a final JSON line.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from bench.train_step import conv_variant
from oasis_jax.ops import convolution

# (name, input size, in channels, out channels, kernel, stride)
SEED_LAYERS = [
    ('enc conv1 4x4/2 1->64', 256, 1, 64, 4, 2),
    ('enc conv2 4x4/2 64->128', 128, 64, 128, 4, 2),
    ('enc conv3 3x3 128->128', 64, 128, 128, 3, 1),
    ('res 3x3 128->32', 64, 128, 32, 3, 1),
    ('res 1x1 32->128', 64, 32, 128, 1, 1),
    ('dec subpixel 3x3 128->256', 64, 128, 256, 3, 1),
    ('dec subpixel 3x3 64->4', 128, 64, 4, 3, 1),
]
DEMO_LAYERS = [   # configs/vqvae.py:demo (64 hidden, 3 downsamples, 32x32 codes), batch 8
    ('enc conv1 4x4/2 1->32', 256, 1, 32, 4, 2),
    ('enc conv2 4x4/2 32->32', 128, 32, 32, 4, 2),
    ('enc conv3 4x4/2 32->64', 64, 32, 64, 4, 2),
    ('enc conv4 3x3 64->64', 32, 64, 64, 3, 1),
    ('res 3x3 64->32', 32, 64, 32, 3, 1),
    ('dec conv 3x3 16->64', 32, 16, 64, 3, 1),
    ('dec subpixel 3x3 64->128', 32, 64, 128, 3, 1),
    ('dec subpixel 3x3 32->128', 64, 32, 128, 3, 1),
    ('dec subpixel 3x3 32->4', 128, 32, 4, 3, 1),
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
  parser.add_argument('--recipe', default='seed', choices=['seed', 'demo'])
  parser.add_argument('--batch', type=int, default=0, help='0: the recipe\'s (seed 32, demo 8)')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--impls', default='xla,im2col,winograd,winograd+xla_transforms')
  args = parser.parse_args()
  impls = args.impls.split(',')
  layers = SEED_LAYERS if args.recipe == 'seed' else DEMO_LAYERS
  args.batch = args.batch or (32 if args.recipe == 'seed' else 8)
  print(f'{"layer":28} ' + ' '.join(f'{impl + " s":>11}' for impl in impls) + '  direct-conv GFLOP/s; speed-up vs '
        f'{impls[0]}; auto')
  rows = []
  for name, size, cin, cout, k, stride in layers:
    x = jax.random.normal(jax.random.key(0), (args.batch, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) / (k * k * cin) ** 0.5
    flops = 3 * 2 * args.batch * (size // stride) ** 2 * k * k * cin * cout

    def make(spec):   # 'winograd+xla_transforms': Winograd without the native transform kernels
      impl, context = conv_variant(spec)
      fn = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(convolution.conv(x, w, stride, impl) ** 2),
                                      argnums=(0, 1)))
      with context:
        return fn.lower(x, w).compile()
    fns = {impl: make(impl) for impl in impls}
    times = {impl: [] for impl in impls}
    for _ in range(args.rounds):
      for impl in impls:
        times[impl] += timed(fns[impl], x, w, rounds=1)
    medians = {impl: statistics.median(times[impl]) for impl in impls}
    auto = convolution.pick(cin, cout, k, stride, (args.batch, size, size, cin))
    rows.append({'layer': name, 'seconds': medians, 'auto': auto})
    print(f'{name:28} ' + ' '.join(f'{medians[impl]:11.3f}' for impl in impls) + '  ' +
          ' '.join(f'{flops / medians[impl] / 1e9:6.1f}' for impl in impls) + '; ' +
          ' '.join(f'{medians[impls[0]] / medians[impl]:5.2f}' for impl in impls) + f'; {auto}', flush=True)
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
