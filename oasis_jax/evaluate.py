"""Evaluate a trained workdir on a split: python -m oasis_jax.evaluate --workdir=DIR --split=test

Stage 1 (vqvae): SSIM and PSNR of reconstructions over the whole split, codebook perplexity and codes used.
Writes WORKDIR/eval_<split>.json and WORKDIR/images/eval_<split>.png (originals over reconstructions), and prints
one final JSON line. The dataset is the one the run was trained on (its saved config).
"""
import json
import sys

from absl import app, flags

from oasis_jax import cli
from oasis_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training workdir (stage 1 or stage 2).')
flags.DEFINE_enum('split', 'test', ['train', 'validate', 'test'], 'Which split to evaluate on.')
flags.DEFINE_integer('batch_size', 16, 'Evaluation batch size (a multiple of the device count).')


def evaluate_vqvae(workdir: str, split: str, batch_size: int) -> dict:
  from oasis_jax import checkpoints, images, input_pipeline, parallel, tfds_oasis, vqvae_trainer
  model, variables, config = checkpoints.load_stage1(workdir)
  source = tfds_oasis.prepare(config.dataset, config.data_dir, config.cache_dir).as_data_source(split)
  sharding = input_pipeline.current_sharding(batch_size, config.image_size)
  p_eval_step = vqvae_trainer.make_eval_step(model, config.num_embeddings)
  result, (originals, reconstructions) = vqvae_trainer.evaluate_split(
      p_eval_step, parallel.replicate(variables), source, sharding)
  result = {'split': split, 'stage': 'vqvae', **result}
  if parallel.is_main_process():
    images.save_png(vqvae_trainer.comparison_grid(originals, reconstructions),
                    checkpoints.path(workdir, 'images', f'eval_{split}.png'))
    with open(checkpoints.path(workdir, f'eval_{split}.json'), 'w') as f:
      json.dump(result, f, indent=2)
  return result


@cli.run
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from oasis_jax import checkpoints
  workdir = cli.check_workdir(FLAGS.workdir)
  stage, _ = checkpoints.read_config(workdir)
  if stage != 'vqvae':
    raise UserError(f'{workdir}: evaluation of {stage} runs is not implemented yet')
  result = evaluate_vqvae(workdir, FLAGS.split, FLAGS.batch_size)
  print(json.dumps(result), flush=True)
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
