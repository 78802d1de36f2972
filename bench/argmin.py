"""jnp.argmin against oasis_jax.ops.reductions' exact two-reduction form, at the seed VQ-VAE's sizes.

    python -m bench.argmin [--rounds=7]

Rows: the seed VQ-VAE's codebook distances (batch 32 x 64x64 codes, K=512), alone and with the distance GEMM in
the same jitted function (vqvae.nearest_codes). Prints median milliseconds of each form, alternating, the
speed-up, and a final JSON line.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from oasis_jax.models.vqvae import nearest_codes, squared_distances
from oasis_jax.ops import reductions


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=7)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  vectors = jnp.asarray(rng.normal(size=(32 * 64 * 64, 64)), jnp.float32)
  codebook = jnp.asarray(rng.normal(size=(512, 64)), jnp.float32)
  cases = {   # name: (inputs, with jnp.argmin, ours)
      'VQ distances [131072, 512], argmin': ((squared_distances(vectors, codebook),),
                                             lambda d: jnp.argmin(d, axis=-1), reductions.argmin),
      'nearest_codes (with the distance GEMM)': ((vectors, codebook),
                                                 nearest_codes,
                                                 lambda v, c: nearest_codes(v, c, reductions.argmin)),
  }
  print(f'{"case":40} {"jnp ms":>8} {"ours ms":>8} {"speed-up":>8}')
  rows = {}
  for name, (inputs, theirs, ours) in cases.items():
    fns = {'jnp': jax.jit(theirs), 'ours': jax.jit(ours)}
    assert np.array_equal(fns['jnp'](*inputs), fns['ours'](*inputs)), name
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
      for k, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times[k].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows[name] = medians
    speed_up = medians['jnp'] / medians['ours']
    print(f'{name:40} {medians["jnp"]:8.1f} {medians["ours"]:8.1f} {speed_up:7.1f}x', flush=True)
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
