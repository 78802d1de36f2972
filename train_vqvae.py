"""Stage 1: train the VQ-VAE.  python train_vqvae.py --config=configs/vqvae.py[:demo|:tiny] --workdir=DIR"""
from absl import app, flags
from ml_collections import config_flags

from oasis_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/vqvae.py', 'Stage-1 config file (and :variant).', lock_config=True)
cli.define_distributed_flags()
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and images; re-run to resume.')


@cli.run
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.keep_freed_memory()   # before JAX starts its threads
  from oasis_jax.training import vqvae_trainer  # imported after flag parsing: JAX starts only when there is work
  vqvae_trainer.train_and_evaluate(FLAGS.config, cli.check_workdir(FLAGS.workdir))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
