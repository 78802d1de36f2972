"""Cold-start wall time of `python sample.py --num=64`, without and with JAX's persistent compilation cache.

    python -m bench.sample [--workdir=runs/demo/gan] [--runs=5]

Each run is a fresh subprocess. 'no cache': OASIS_JAX_CACHE points at a new empty directory every run, so every
XLA compilation happens; 'cache': one shared directory, filled by a first run that is not counted. Prints the
median of --runs runs of each, alternating, and a final JSON line.
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


def timed(workdir, outdir, cache):
  env = {**os.environ, 'OASIS_JAX_CACHE': cache}
  start = time.perf_counter()
  subprocess.run([sys.executable, 'sample.py', '--num=64', f'--workdir={workdir}', f'--outdir={outdir}'], cwd=REPO,
                 env=env, check=True, capture_output=True)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='runs/demo/gan', help='A trained stage-2 workdir (make demo makes one).')
  parser.add_argument('--runs', type=int, default=5)
  args = parser.parse_args()
  if not os.path.isdir(os.path.join(REPO, args.workdir)) and not os.path.isdir(args.workdir):
    raise SystemExit(f'{args.workdir}: no stage-2 workdir; run `make demo` first or pass --workdir')
  root = tempfile.mkdtemp(prefix='bench_sample_')
  shared = os.path.join(root, 'shared_cache')
  timed(args.workdir, os.path.join(root, 'out'), shared)   # fills the shared cache; not counted
  times = {'no cache': [], 'cache': []}
  for run in range(args.runs):
    times['no cache'].append(timed(args.workdir, os.path.join(root, 'out'), os.path.join(root, f'empty_{run}')))
    times['cache'].append(timed(args.workdir, os.path.join(root, 'out'), shared))
  print(f'python sample.py --num=64 --workdir={args.workdir}: cold subprocess wall time, {args.runs} runs each')
  for name, values in times.items():
    print(f'  {name:9} median {statistics.median(values):6.2f} s   runs ' + ' '.join(f'{v:.2f}' for v in values))
  print(json.dumps({name: statistics.median(values) for name, values in times.items()}))


if __name__ == '__main__':
  main()
