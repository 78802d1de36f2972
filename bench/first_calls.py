"""Start-up of a stage-1 run: wall time of the first train-step calls in a fresh process, as train_vqvae.py makes them.

    python -m bench.first_calls [--config=default] [--runs=3]

Each run is a fresh subprocess that builds the state, replicates it with parallel.replicate and makes three calls
of the pmapped vqvae_trainer.train_steps (config.steps_per_call steps each, the seed recipe by default: 256x256,
batch 32, 10 steps per call), feeding each call's state to the next as the training loop does. Call 1 includes
tracing, lowering and compiling; a call 2 as slow as call 1 means the step was compiled again. 'no cache': a new
empty OASIS_JAX_CACHE every run; 'cache': one shared compilation cache, filled by a first run that is not counted.
Prints the median of --runs runs of each, alternating, and a final JSON line.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(config_name: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs import vqvae as vqvae_configs
  from oasis_jax import cli, parallel
  from oasis_jax.training import vqvae_trainer
  from bench import train_step   # bench/train_step.py: the step pmapped as train_vqvae.py pmaps it
  cli.enable_compilation_cache()
  config = vqvae_configs.get_config(config_name)
  per_call = config.steps_per_call
  per_device = config.batch_size // jax.local_device_count()
  batch = np.random.default_rng(0).random((per_device, config.image_size, config.image_size, 1), np.float32)
  images = np.broadcast_to(batch, (jax.local_device_count(), per_call) + batch.shape)
  keys = jnp.stack([jax.random.key(i) for i in range(per_call)])
  p_state = parallel.replicate(vqvae_trainer.create_state(config, jax.random.key(0)))
  call = train_step.pmapped_step(config, vqvae_trainer.train_steps)
  times = []
  for _ in range(3):
    start = time.perf_counter()
    p_state, metrics = call(p_state, images, keys)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  print(json.dumps({'calls_s': times}))


def timed(config_name: str, cache: str) -> list:
  out = subprocess.run([sys.executable, '-m', 'bench.first_calls', f'--child={config_name}'], cwd=REPO, check=True,
                       env={**os.environ, 'OASIS_JAX_CACHE': cache}, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])['calls_s']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='default', help='configs/vqvae.py variant')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.child)
  root = tempfile.mkdtemp(prefix='bench_first_calls_')
  shared = os.path.join(root, 'shared_cache')
  timed(args.config, shared)   # fills the shared cache; not counted
  runs = {'no cache': [], 'cache': []}
  for run in range(args.runs):
    runs['no cache'].append(timed(args.config, os.path.join(root, f'empty_{run}')))
    runs['cache'].append(timed(args.config, shared))
  print(f'{args.config} recipe, first three calls of the stage-1 train step in a fresh process, median of '
        f'{args.runs} runs (s)')
  summary = {}
  for name, values in runs.items():
    medians = [statistics.median(v[i] for v in values) for i in range(3)]
    summary[name] = medians
    print(f'  {name:9} call 1 {medians[0]:7.1f}   call 2 {medians[1]:7.1f}   call 3 {medians[2]:7.1f}')
  print(json.dumps({'config': args.config, 'median_calls_s': summary}))


if __name__ == '__main__':
  main()
