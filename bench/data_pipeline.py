"""Input pipeline throughput: slices/s delivered by the grain training iterator from a prepared dataset.

Usage: python -m bench.data_pipeline [--dataset=demo|oasis_png] [--data_dir=PATH] [--batch=32] [--batches=40]
Prints one row per run and a final summary line with the median over runs.
"""
import argparse
import statistics
import time

from oasis_jax.data import input_pipeline, tfds_oasis


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--dataset', default='demo')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--cache_dir', default='')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--devices', type=int, default=1)
  args = parser.parse_args()
  source = tfds_oasis.prepare(args.dataset, args.data_dir, args.cache_dir).as_data_source('train')
  sharding = input_pipeline.Sharding(args.batch, local_devices=args.devices)
  rates = []
  print(f'{"run":>4} {"slices/s":>10}   ({args.dataset}, {len(source)} train slices, batch {args.batch})')
  for run in range(args.runs):
    iterator = input_pipeline.train_iterator(source, sharding, seed=run)
    next(iterator)  # start the reader threads
    start = time.perf_counter()
    for _ in range(args.batches):
      next(iterator)
    rates.append(args.batches * args.batch / (time.perf_counter() - start))
    print(f'{run:>4} {rates[-1]:>10.0f}')
  print(f'data_pipeline: median {statistics.median(rates):.0f} slices/s over {args.runs} runs '
        f'(batch {args.batch}, {args.batches} batches per run)')


if __name__ == '__main__':
  main()
