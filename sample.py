"""Write new brain slices: python sample.py --num=64 [--workdir=DIR] [--outdir=DIR] [--seed=S]"""
import os

from absl import app, flags

from oasis_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_integer('num', 64, 'How many samples to write.')
flags.DEFINE_string('workdir', 'runs/demo/gan', 'The stage-2 (train_gan.py) workdir.')
flags.DEFINE_string('outdir', None, 'Where the PNGs go (default: WORKDIR/samples).')
flags.DEFINE_integer('seed', 0, 'Random seed: the same seed gives the same images.')
flags.DEFINE_string('vqvae_workdir', '', 'The stage-1 workdir to decode with (default: the one the run recorded).')


@cli.run
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.keep_freed_memory()   # before JAX starts its threads
  from oasis_jax import sampling, timing
  phases = timing.Phases()
  outdir = FLAGS.outdir or os.path.join(FLAGS.workdir, 'samples')
  with phases('sample'):
    files = sampling.write_samples(FLAGS.workdir, outdir, FLAGS.num, FLAGS.seed, vqvae_workdir=FLAGS.vqvae_workdir)
  phases.write(FLAGS.workdir, 'sample')
  print(f'wrote {len(files)} samples and grid.png to {outdir}', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
