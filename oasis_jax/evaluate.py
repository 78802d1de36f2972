"""Evaluate a trained workdir on a split: python -m oasis_jax.evaluate [--stage=vqvae|gan] --workdir=DIR --split=test

Prints one final JSON line (and writes WORKDIR/eval_<split>.json); what it measures: oasis_jax/evaluation.py.
"""
import json
import sys

import jax
from absl import app, flags

from oasis_jax import cli
from oasis_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training workdir (stage 1 or stage 2).')
flags.DEFINE_enum('split', 'test', ['train', 'validate', 'test'], 'Which split to evaluate on.')
flags.DEFINE_integer('batch_size', 16, 'Evaluation batch size (a multiple of the device count).')
flags.DEFINE_enum('stage', None, ['vqvae', 'gan'], 'The stage the workdir holds (default: read from its config).')
flags.DEFINE_integer('seed', 0, 'Stage 2: the seed of the evaluated samples.')
flags.DEFINE_string('vqvae_workdir', '', 'Stage 2: decode with this stage-1 workdir (default: the recorded one).')
flags.DEFINE_integer('c2st_images', 1024, 'The classifier two-sample test uses up to this many training slices per set.')


@cli.run
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.keep_freed_memory()   # before JAX starts its threads
  from oasis_jax import checkpoints, evaluation, timing   # imported after flag parsing: JAX starts only when needed
  phases = timing.Phases()
  workdir = cli.check_workdir(FLAGS.workdir)
  stage, _ = checkpoints.read_config(workdir)
  if FLAGS.stage and FLAGS.stage != stage:
    raise UserError(f'{workdir}: holds a {stage} run, not a {FLAGS.stage} run (--stage)')
  if FLAGS.c2st_images < 10:
    raise UserError(f'--c2st_images={FLAGS.c2st_images}: expected at least 10 (5 folds of two sets)')
  if FLAGS.batch_size <= 0 or FLAGS.batch_size % jax.local_device_count():
    raise UserError(f'--batch_size={FLAGS.batch_size}: expected a positive multiple of the device count '
                    f'({jax.local_device_count()})')
  with phases('evaluate'):
    if stage == checkpoints.STAGE1:
      result = evaluation.evaluate_vqvae(workdir, FLAGS.split, FLAGS.batch_size, FLAGS.c2st_images)
    else:
      result = evaluation.evaluate_gan(workdir, FLAGS.split, FLAGS.batch_size, FLAGS.seed, FLAGS.c2st_images,
                                       FLAGS.vqvae_workdir)
  phases.write(workdir, f'evaluate --split={FLAGS.split}')
  print(json.dumps(result), flush=True)
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
