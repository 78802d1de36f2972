"""New slices from a trained stage 2: the generator's code maps rendered by stage 1's decoder, written as PNGs."""
import os
from typing import Any, Callable, NamedTuple

import ml_collections

from oasis_jax import checkpoints, gan_trainer, images
from oasis_jax.errors import UserError


class Loaded(NamedTuple):
  """A trained stage 2 with the stage 1 it renders through."""
  sample: Callable          # gan_trainer.make_sampler's function
  g_variables: dict         # the generator's (EMA) params and batch-norm averages
  stage1_model: Any
  stage1_variables: dict
  stage1_config: ml_collections.ConfigDict
  config: ml_collections.ConfigDict   # the stage-2 run's


def load_generator(workdir: str) -> Loaded:
  """A stage-2 run from its best checkpoint (lowest validation SWD), else its latest, and its stage 1."""
  if not os.path.isdir(checkpoints.path(workdir)):
    raise UserError(f'{workdir}: stage-2 workdir does not exist (train it with train_gan.py, or pass --workdir)')
  stage, config = checkpoints.read_config(workdir)
  if stage != gan_trainer.STAGE:
    raise UserError(f'{workdir}: holds a {stage} run, expected a stage-2 (gan) workdir')
  stage1_model, stage1_variables, stage1_config = checkpoints.load_stage1(config.vqvae_workdir)
  gan_trainer.check_stage1_unchanged(config, stage1_config)
  state, _ = checkpoints.restore_raw(checkpoints.best_or_latest(workdir), 'stage-2')
  generator_state = state['0'] if '0' in state else state[0]
  g_variables = {'params': generator_state['ema_params'], 'batch_stats': generator_state['batch_stats']}
  generator, _ = gan_trainer.make_models(config, stage1_config)
  return Loaded(gan_trainer.make_sampler(generator, stage1_model, config.head), g_variables, stage1_model,
                stage1_variables, stage1_config, config)


def write_samples(workdir: str, outdir: str, num: int, seed: int, batch: int = 16) -> list[str]:
  """Writes sample_0000.png ... and grid.png into outdir; the same seed gives the same images."""
  if num <= 0:
    raise UserError(f'--num={num}: expected a positive number of samples')
  loaded = load_generator(workdir)
  try:
    os.makedirs(outdir, exist_ok=True)
    probe = os.path.join(outdir, '.write_test')
    open(probe, 'w').close()
    os.remove(probe)
  except OSError as error:
    raise UserError(f'{outdir}: cannot write samples there ({error.strerror})') from None
  rendered, _ = gan_trainer.generate(loaded.sample, loaded.g_variables, loaded.stage1_variables, num,
                                     loaded.config.latent_dim, seed, batch)
  files = []
  for i, image in enumerate(rendered):
    files.append(os.path.join(outdir, f'sample_{i:04d}.png'))
    images.save_png(images.to_uint8(image), files[-1])
  images.save_png(images.grid(rendered, columns=8), os.path.join(outdir, 'grid.png'))
  return files
