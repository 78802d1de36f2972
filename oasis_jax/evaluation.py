"""Evaluation of a trained workdir on a split (the library behind `python -m oasis_jax.evaluate`).

Stage 1 (vqvae): SSIM and PSNR of reconstructions over the whole split, codebook perplexity and codes used.
Stage 2 (gan): as many samples as the split has slices, compared with the split's real slices, and the same numbers
for stage-1 reconstructions of those slices as the reference point (no downloaded weights):
  swd        sliced Wasserstein distance on Laplacian-pyramid 7x7 patches (Karras et al. 2018), x1e3, to the split
  ms_ssim    mean MS-SSIM between pairs of images of the set: diversity (lower = more diverse)
  code_kl    KL(code histogram of the split's slices || code histogram of the set)
  nn_ssim    mean over the set of the highest SSIM against any training slice (64x64): memorisation check
  code_repeats  of neighbouring code-map positions inside the brain, the fraction holding the same code (real
                maps repeat far less often than generated ones, whose repeats render as dotted dashes)
Both stages also report a classifier two-sample test (oasis_jax/c2st.py) on up to `c2st_images` training slices:
held-out accuracy of telling reconstructions from the real slices (stage 1's ceiling), and for stage 2 samples
from reconstructions (stage 2's own gap: a perfect generator matches the reconstructions) and samples from real
slices; beside them the baseline, two halves of the real slices, which should be near 0.5.
Each evaluate_* returns the figures as a dict and writes them to WORKDIR/eval_<split>.json, with a picture under
WORKDIR/images/. The dataset is the one the run was trained on (its saved config).
"""
import json

import jax.numpy as jnp
import numpy as np

from oasis_jax import c2st, checkpoints, images, metrics, parallel, sampling, stage1
from oasis_jax.data import input_pipeline, tfds_oasis
from oasis_jax.errors import naming_full_disk

C2ST_IMAGES = 1024   # the default: at most this many training slices (evenly spaced) per C2ST set


def c2st_scores(real, groups, reconstructions, samples=None, seed: int = 0) -> dict:
  """C2ST held-out accuracies: real vs real (two halves, split by `groups` of near-copies), reconstructions vs
  real, and where samples are given samples vs reconstructions and samples vs real. All sets [N, S, S, 1] in
  [0, 1]; real[i] and reconstructions[i] are the same slice."""
  real_features, reconstruction_features = c2st.features(real), c2st.features(reconstructions)
  result = {'images_per_set': len(real),
            'real_vs_real': c2st.real_vs_real(real_features, groups, seed=seed)['accuracy'],
            'reconstructions_vs_real': c2st.accuracy(reconstruction_features, real_features, seed=seed,
                                                     groups_a=groups, groups_b=groups)['accuracy']}
  if samples is not None:
    sample_features = c2st.features(samples)
    result['samples_vs_reconstructions'] = c2st.accuracy(sample_features, reconstruction_features, seed=seed,
                                                         groups_b=groups)['accuracy']
    result['samples_vs_real'] = c2st.accuracy(sample_features, real_features, seed=seed,
                                              groups_b=groups)['accuracy']
  result['std_error'] = 0.5 / np.sqrt(2 * len(real))   # binomial standard error of an accuracy near 0.5
  return result


def evaluate_vqvae(workdir: str, split: str, batch_size: int, c2st_images: int = C2ST_IMAGES) -> dict:
  model, variables, config = stage1.load(workdir)
  builder = tfds_oasis.prepare(config.dataset, config.data_dir, config.cache_dir)
  source = builder.as_data_source(split)
  sharding = input_pipeline.current_sharding(batch_size, config.image_size)
  p_eval_step = stage1.make_eval_step(model, config.num_embeddings)
  result, (originals, reconstructions) = stage1.evaluate_split(
      p_eval_step, parallel.replicate(variables), source, sharding)
  train_source = builder.as_data_source('train')
  train = input_pipeline.load_images(train_source, config.image_size, c2st_images)
  groups = input_pipeline.load_groups(train_source, config.dataset, c2st_images)
  result = {'split': split, 'stage': 'vqvae', **result,
            'c2st': c2st_scores(train, groups, stage1.reconstruct(model, variables, train, batch_size))}
  if parallel.is_main_process():
    images.save_png(stage1.comparison_grid(originals, reconstructions),
                    checkpoints.path(workdir, 'images', f'eval_{split}.png'))
    file = checkpoints.path(workdir, f'eval_{split}.json')
    with naming_full_disk(file), open(file, 'w') as f:
      json.dump(result, f, indent=2)
  return result


def evaluate_gan(workdir: str, split: str, batch_size: int, seed: int, c2st_images: int = C2ST_IMAGES,
                 vqvae_workdir: str = '') -> dict:
  loaded = sampling.load(workdir, vqvae_workdir)
  stage1_model, stage1_variables, stage1_config, config = (loaded.stage1_model, loaded.stage1_variables,
                                                           loaded.stage1_config, loaded.config)
  builder = tfds_oasis.prepare(config.dataset, config.data_dir, config.cache_dir)
  source, train_source = builder.as_data_source(split), builder.as_data_source('train')
  real = input_pipeline.load_images(source, stage1_config.image_size)
  samples, sample_codes = sampling.generate(loaded.sample, loaded.g_variables, stage1_variables, len(real),
                                               config.latent_dim, seed, batch_size)
  real_codes = stage1.encode_split(stage1_model, stage1_variables, source, stage1_config.image_size)
  train_codes = stage1.encode_split(stage1_model, stage1_variables, train_source, stage1_config.image_size)
  reconstructions = stage1.decode(stage1_model, stage1_variables, real_codes, batch_size)
  train_small = input_pipeline.load_images(train_source, min(64, stage1_config.image_size))
  k = stage1_config.num_embeddings
  histogram = lambda codes: jnp.bincount(jnp.asarray(codes).reshape(-1), length=k)
  real_histogram = histogram(real_codes)

  def scores(images_, codes):
    return {'swd': metrics.swd(images_, real)['mean'], 'ms_ssim': metrics.ms_ssim_diversity(images_),
            'code_kl': float(metrics.code_histogram_kl(real_histogram, histogram(codes))),
            'nn_ssim': float(metrics.nearest_neighbour_ssim(images_, train_small).mean()),
            'code_repeats': metrics.code_repeats(codes, images_)}
  result = {'split': split, 'stage': 'gan', 'images': len(real), 'seed': seed,
            'sample_gumbel_scale': sampling.sample_gumbel_scale(config),
            'samples': scores(samples, sample_codes),
            # Reference point: stage-1 reconstructions of the split (their code_kl is the train/split gap).
            'reconstructions': {**scores(reconstructions, real_codes),
                                'code_kl': float(metrics.code_histogram_kl(real_histogram, histogram(train_codes)))},
            'real': {'swd_self': metrics.swd(real, real, seed=1)['mean'], 'ms_ssim': metrics.ms_ssim_diversity(real),
                     'nn_ssim': float(metrics.nearest_neighbour_ssim(real, train_small).mean())}}
  train = input_pipeline.load_images(train_source, stage1_config.image_size, c2st_images)
  groups = input_pipeline.load_groups(train_source, config.dataset, c2st_images)
  c2st_samples, _ = sampling.generate(loaded.sample, loaded.g_variables, stage1_variables, len(train),
                                      config.latent_dim, seed + 1, batch_size)
  train_reconstructions = stage1.decode(stage1_model, stage1_variables,
                                        train_codes[input_pipeline.spaced_rows(len(train_source), c2st_images)],
                                        batch_size)   # the slices `train` holds, from the codes encoded above
  result['c2st'] = c2st_scores(train, groups, train_reconstructions, c2st_samples, seed)
  if parallel.is_main_process():
    count = min(8, len(real))
    picture = np.concatenate([real[:count], reconstructions[:count], samples[:count]])
    images.save_png(images.grid(picture, columns=count), checkpoints.path(workdir, 'images', f'eval_{split}.png'))
    file = checkpoints.path(workdir, f'eval_{split}.json')
    with naming_full_disk(file), open(file, 'w') as f:
      json.dump(result, f, indent=2)
  return result
