"""Stage-2 training: `train_and_evaluate(config, workdir)` for the DCGAN over stage-1 code maps.

The real code maps are made once at start: stage 1's encoder + codebook over every training slice. Each pmapped step
updates the discriminator (optionally with an R1 penalty), then the generator (non-saturating or hinge loss), with
gradients and batch-norm statistics averaged over devices. Every `sample_every_steps` the generator's samples are
rendered and scored against validation slices (sliced Wasserstein distance, MS-SSIM diversity); WORKDIR/best/ keeps
the checkpoint with the lowest SWD, which sample.py and evaluate use.
"""
import functools
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from oasis_jax import (checkpoints, convolution, dcgan, images, input_pipeline, metrics, parallel, progress,
                       tfds_oasis, vqvae)
from oasis_jax.errors import UserError

STAGE = 'gan'
# Fields that define the models: a resumed run must have the same ones.
STAGE1_FIELDS = ('image_size', 'num_downsamples', 'num_embeddings', 'embedding_dim')
MODEL_FIELDS = ('head', 'latent_dim', 'generator_width', 'discriminator_width', 'upsample', 'minibatch_std_group')


class GeneratorState(train_state.TrainState):
  batch_stats: Any
  ema_params: Any   # exponential moving average of params (config.generator_ema; = params when it is 0): sampled


def code_size(stage1_config) -> int:
  return stage1_config.image_size // 2 ** stage1_config.num_downsamples


def resolve_data(config, stage1_config) -> ml_collections.ConfigDict:
  """Empty dataset/data_dir/cache_dir fields take the stage-1 run's; `stage1_model` records the stage-1 model
  fields, so that a stage-1 run retrained differently later is caught instead of decoding nonsense."""
  config = ml_collections.ConfigDict(config.to_dict())
  for field in ('dataset', 'data_dir', 'cache_dir'):
    if not config[field]:
      config[field] = stage1_config[field]
  config.stage1_model = {field: stage1_config[field] for field in STAGE1_FIELDS}
  return config


def check_stage1_unchanged(config, stage1_config) -> None:
  """A stage-2 run only fits the stage-1 model it was trained with."""
  for field in STAGE1_FIELDS:
    if 'stage1_model' in config and config.stage1_model[field] != stage1_config[field]:
      raise UserError(f'{config.vqvae_workdir}: stage-1 {field}={stage1_config[field]!r}, but this stage-2 run was '
                      f'trained with {config.stage1_model[field]!r}: train stage 2 again in another --workdir')


def check_config(config, stage1_config) -> None:
  size = code_size(stage1_config)
  if size < 8 or size & (size - 1):
    raise UserError(f'{config.vqvae_workdir}: stage-1 code maps are {size}x{size}; the DCGAN needs a power of two >= 8')
  for field in ('latent_dim', 'generator_width', 'discriminator_width', 'num_train_steps', 'batch_size'):
    if config[field] <= 0:
      raise UserError(f'config.{field}={config[field]}: expected a positive number')
  convolution.check_impl(config.get('conv_impl', 'xla'))
  if config.head not in ('logits', 'latent'):
    raise UserError(f'config.head={config.head!r}: expected logits (design a) or latent (design b)')
  if config.loss not in ('nonsaturating', 'hinge'):
    raise UserError(f'config.loss={config.loss!r}: expected nonsaturating or hinge')
  if config.gumbel_temperature <= 0:
    raise UserError(f'config.gumbel_temperature={config.gumbel_temperature}: expected a positive number')
  if config.r1_gamma < 0 or config.minibatch_std_group < 0:
    raise UserError('config.r1_gamma and config.minibatch_std_group: expected numbers >= 0')
  if not 0 <= config.generator_ema < 1:
    raise UserError(f'config.generator_ema={config.generator_ema}: expected a value in [0, 1)')
  per_device = config.batch_size // max(jax.device_count(), 1)
  if config.minibatch_std_group and per_device % min(config.minibatch_std_group, per_device):
    raise UserError(f'config.minibatch_std_group={config.minibatch_std_group}: expected a divisor of the per-device '
                    f'batch ({per_device})')


def make_models(config, stage1_config, axis_name=None):
  size = code_size(stage1_config)
  out = stage1_config.num_embeddings if config.head == 'logits' else stage1_config.embedding_dim
  impl = config.get('conv_impl', 'xla')   # runs saved before the field existed used XLA's convolutions
  return (dcgan.Generator(size, out, config.generator_width, config.upsample, axis_name, impl),
          dcgan.Discriminator(size, config.discriminator_width, config.minibatch_std_group, impl))


def create_states(config, stage1_config, key):
  generator, discriminator = make_models(config, stage1_config)
  size, d = code_size(stage1_config), stage1_config.embedding_dim
  tx = lambda: optax.adam(config.learning_rate, b1=config.beta1)

  def create(key):
    g_key, d_key = jax.random.split(key)
    g_vars = generator.init(g_key, jnp.zeros((2, config.latent_dim)), train=False)
    d_vars = discriminator.init(d_key, jnp.zeros((2, size, size, d)))
    return (GeneratorState.create(apply_fn=None, params=g_vars['params'], batch_stats=g_vars['batch_stats'],
                                  ema_params=g_vars['params'], tx=tx()),
            train_state.TrainState.create(apply_fn=None, params=d_vars['params'], tx=tx()))
  return jax.jit(create)(key)


def per_row_noise(key, rows, draw):
  """draw(fold_in(key, row)) for each global row index: the same noise for a row on 1 device or on many."""
  return jax.vmap(lambda row: draw(jax.random.fold_in(key, row)))(rows)


def generated_codes(outputs, codebook, config, gumbel_noise):
  """Generator outputs -> (what the discriminator sees [N, s, s, D], codes [N, s, s], head penalty).

  Both heads are straight-through: the forward pass holds codebook vectors of valid codes only."""
  if config.head == 'logits':
    one_hot, codes = dcgan.gumbel_straight_through(outputs, gumbel_noise, config.gumbel_temperature)
    return dcgan.embed(one_hot, codebook), codes, 0.0
  quantized, codes = dcgan.quantize_straight_through(outputs, codebook)
  # Keeps the continuous latents near the codebook vectors they stand for (stage 1's commitment term).
  commitment = jnp.mean((outputs - jax.lax.stop_gradient(jnp.take(codebook, codes, axis=0))) ** 2)
  return quantized, codes, config.latent_commitment * commitment


def discriminator_loss(real_logits, fake_logits, kind: str):
  if kind == 'hinge':
    return jax.nn.relu(1 - real_logits).mean() + jax.nn.relu(1 + fake_logits).mean()
  return optax.sigmoid_binary_cross_entropy(real_logits, 1.0).mean() + \
      optax.sigmoid_binary_cross_entropy(fake_logits, 0.0).mean()


def generator_loss(fake_logits, kind: str):
  if kind == 'hinge':
    return -fake_logits.mean()
  return optax.sigmoid_binary_cross_entropy(fake_logits, 1.0).mean()  # non-saturating: -log D(G(z))


def train_step(states, real_codes, key, codebook, *, config, generator, discriminator):
  """One discriminator update, then one generator update, on this device's shard of the batch."""
  g_state, d_state = states
  batch, k = real_codes.shape[0], codebook.shape[0]
  # Noise is drawn per global row (key folded with the row's index in the global batch), so a step is the same
  # function of the global batch on 1 device or on many.
  rows = jax.lax.axis_index(parallel.AXIS) * batch + jnp.arange(batch)
  d_key, g_key = jax.random.split(key)

  def generate(g_params, key):
    z_key, gumbel_key = jax.random.split(key)
    z = per_row_noise(z_key, rows, lambda k_: jax.random.normal(k_, (config.latent_dim,)))
    outputs, updates = generator.apply({'params': g_params, 'batch_stats': g_state.batch_stats}, z, train=True,
                                       mutable=['batch_stats'])
    gumbel = per_row_noise(gumbel_key, rows, lambda k_: jax.random.gumbel(k_, outputs.shape[1:], outputs.dtype))
    fake, codes, penalty = generated_codes(outputs, codebook, config, gumbel)
    return fake, codes, penalty, updates['batch_stats']

  fake = generate(g_state.params, d_key)[0]
  real = jnp.take(codebook, real_codes, axis=0)   # = one_hot(real codes) @ codebook

  def d_loss_fn(d_params):
    apply = lambda x: discriminator.apply({'params': d_params}, x)
    real_logits, fake_logits = apply(real), apply(jax.lax.stop_gradient(fake))
    loss = discriminator_loss(real_logits, fake_logits, config.loss)
    r1 = 0.0
    if config.r1_gamma > 0:   # R1 (Mescheder et al. 2018): gradient penalty on real inputs
      grads = jax.grad(lambda x: apply(x).sum())(real)
      r1 = jnp.mean(jnp.sum(grads ** 2, axis=(1, 2, 3)))
    return loss + config.r1_gamma / 2 * r1, (loss, r1, jax.nn.sigmoid(real_logits).mean(),
                                             jax.nn.sigmoid(fake_logits).mean())

  (_, (d_loss, r1, d_real, d_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_state.params)
  d_state = d_state.apply_gradients(grads=jax.lax.pmean(d_grads, parallel.AXIS))

  def g_loss_fn(g_params):
    fake, codes, penalty, batch_stats = generate(g_params, g_key)
    loss = generator_loss(discriminator.apply({'params': d_state.params}, fake), config.loss)
    return loss + penalty, (loss, batch_stats, codes)

  (_, (g_loss, batch_stats, codes)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_state.params)
  g_state = g_state.apply_gradients(grads=jax.lax.pmean(g_grads, parallel.AXIS)).replace(batch_stats=batch_stats)
  g_state = g_state.replace(ema_params=optax.incremental_update(g_state.params, g_state.ema_params,
                                                                1.0 - config.generator_ema))
  fake_counts = jax.lax.psum(jnp.bincount(codes.reshape(-1), length=k), parallel.AXIS)
  real_counts = jax.lax.psum(jnp.bincount(real_codes.reshape(-1), length=k), parallel.AXIS)
  step_metrics = jax.lax.pmean({'d_loss': d_loss, 'g_loss': g_loss, 'd_real': d_real, 'd_fake': d_fake, 'r1': r1},
                               parallel.AXIS)
  step_metrics['codes_used'] = jnp.sum(fake_counts > 0)
  step_metrics['code_kl'] = metrics.code_histogram_kl(real_counts, fake_counts)
  return (g_state, d_state), step_metrics


def encode_split(stage1_model, stage1_variables, source, image_size: int, batch_size: int = 32) -> np.ndarray:
  """The code maps [N, s, s] int32 of every slice of a split, in order (stage 1's encoder + codebook)."""
  sharding = input_pipeline.current_sharding(batch_size * jax.local_device_count(), image_size)
  sharding = input_pipeline.Sharding(sharding.global_batch, 1, 0, sharding.local_devices, image_size)
  encode = jax.pmap(lambda v, x: stage1_model.apply(v, x, method=vqvae.VQVAE.encode_to_codes))
  p_variables = parallel.replicate(stage1_variables)
  maps = []
  for batch, mask in input_pipeline.eval_batches(source, sharding):
    codes = np.asarray(encode(p_variables, batch))
    maps.append(codes[mask])
  return np.concatenate(maps)


def code_batches(code_maps: np.ndarray, sharding: input_pipeline.Sharding, seed: int):
  """Checkpointable iterator of shuffled real code-map batches [local_devices, per_device, s, s]."""
  start, stop = sharding.process_index * sharding.per_process, (sharding.process_index + 1) * sharding.per_process
  dataset = (grain.MapDataset.range(len(code_maps)).seed(seed).shuffle().repeat()
             .batch(sharding.global_batch, drop_remainder=True)
             .map(lambda rows: code_maps[rows[start:stop]].reshape((sharding.local_devices, -1) + code_maps.shape[1:])))
  return iter(dataset.to_iter_dataset())


def make_sampler(generator, stage1_model, head: str):
  """(g_variables, stage1_variables, z [N, latent], rows [N], key) -> (images [N, S, S, 1] in [0, 1], codes [N, s, s]).

  Sample i is a function of (z_i, key, rows_i) only, so batching does not change it. The generator runs with its
  batch-norm running averages (train=False)."""

  def sample(g_variables, stage1_variables, z, rows, key):
    outputs = generator.apply(g_variables, z, train=False)
    gumbel = per_row_noise(key, rows, lambda k_: jax.random.gumbel(k_, outputs.shape[1:], outputs.dtype))
    codes = dcgan.sample_codes(outputs, stage1_variables[vqvae.VQ]['codebook'], head, gumbel)
    decoded = stage1_model.apply(stage1_variables, codes, method=vqvae.VQVAE.decode_codes)
    return jnp.clip(decoded, 0, 1), codes
  return jax.jit(sample)


def generate(sampler, g_variables, stage1_variables, num: int, latent_dim: int, seed: int, batch: int = 16):
  """`num` samples (images [num, S, S, 1], codes [num, s, s]) for a seed, in fixed-size batches (one compile)."""
  z = np.asarray(jax.random.normal(jax.random.key(seed), (num, latent_dim)))
  noise_key = jax.random.key(seed + 1)
  images, codes = [], []
  for begin in range(0, num, batch):
    rows = np.arange(begin, begin + batch)
    chunk = np.zeros((batch, latent_dim), np.float32)
    chunk[:min(batch, num - begin)] = z[begin:begin + batch]
    out, out_codes = jax.device_get(sampler(g_variables, stage1_variables, chunk, rows, noise_key))
    images.append(out[:num - begin])
    codes.append(out_codes[:num - begin])
  return np.concatenate(images), np.concatenate(codes)


def sampling_variables(g_state) -> dict:
  """The generator variables samples are drawn from: the EMA weights and the batch-norm running averages."""
  return {'params': g_state.ema_params, 'batch_stats': g_state.batch_stats}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains stage 2 in workdir (resuming from its latest checkpoint)."""
  stage1_model, stage1_variables, stage1_config = checkpoints.load_stage1(config.vqvae_workdir)
  config = resolve_data(config, stage1_config)
  check_config(config, stage1_config)
  sharding = input_pipeline.current_sharding(config.batch_size, stage1_config.image_size)
  checkpoints.write_config(workdir, config, STAGE,
                           must_match=MODEL_FIELDS + ('vqvae_workdir', 'stage1_model', 'batch_size', 'seed'))
  builder = parallel.main_process_first(
      lambda: tfds_oasis.prepare(config.dataset, config.data_dir, config.cache_dir))
  train_source = builder.as_data_source('train')
  if len(train_source) < config.batch_size:
    raise UserError(f'config.batch_size={config.batch_size}: larger than the training split ({len(train_source)})')
  print(f'[gan] encoding {len(train_source)} training slices with stage 1 ({config.vqvae_workdir})', flush=True)
  real_maps = encode_split(stage1_model, stage1_variables, train_source, stage1_config.image_size)
  validation_images = input_pipeline.load_images(builder.as_data_source('validate'), stage1_config.image_size,
                                                  config.eval_images)
  codebook = jnp.asarray(stage1_variables['vq']['codebook'])

  states = create_states(config, stage1_config, jax.random.key(config.seed))
  iterator = code_batches(real_maps, sharding, config.seed)
  store = checkpoints.Checkpoints(workdir, best_metric='neg_swd')
  restored = store.restore_latest(jax.device_get(states))
  if restored is not None:
    states, data_state = restored
    iterator.set_state(data_state)
    print(f'[gan] resuming {workdir} from step {int(states[0].step)}', flush=True)
  start_step = int(states[0].step)
  generator, discriminator = make_models(config, stage1_config, axis_name=parallel.AXIS)
  p_states = parallel.replicate(states)
  p_train_step = jax.pmap(
      functools.partial(train_step, config=config, generator=generator, discriminator=discriminator),
      axis_name=parallel.AXIS, donate_argnums=(0,), in_axes=(0, 0, None, None))
  sampler = make_sampler(make_models(config, stage1_config)[0], stage1_model, config.head)
  log = progress.Progress(workdir, config.num_train_steps, start_step, 'gan')
  print(f'[gan] {config.num_train_steps} steps, global batch {config.batch_size} on {jax.device_count()} device(s), '
        f'code maps {real_maps.shape[1]}x{real_maps.shape[2]} over K={stage1_config.num_embeddings}, '
        f'head {config.head}', flush=True)
  base_key = jax.random.key(config.seed + 1)
  history = progress.History()
  summary = {}
  for step in range(start_step + 1, config.num_train_steps + 1):
    p_states, step_metrics = p_train_step(p_states, next(iterator), jax.random.fold_in(base_key, step), codebook)
    history.append(step_metrics)
    is_last = step == config.num_train_steps
    do_eval = step % config.sample_every_steps == 0 or is_last
    do_save = step % config.checkpoint_every_steps == 0 or do_eval
    if step % config.log_every_steps == 0 or do_save:
      summary = history.summary(step, store)   # stops on a non-finite value before anything is saved
      log.report(step, summary)
    validation = None
    if do_eval:
      g_state = parallel.unreplicate(p_states[0])
      samples, _ = generate(sampler, sampling_variables(g_state), stage1_variables, config.eval_samples,
                            config.latent_dim, config.seed + 2)
      validation = {'swd': metrics.swd(samples, validation_images)['mean'],
                    'ms_ssim': metrics.ms_ssim_diversity(samples, max_pairs=256)}
      log.report(step, validation, prefix='validate')
      grid = images.grid(samples[:16], columns=8)
      log.image(step, 'samples', grid)
      if parallel.is_main_process():
        images.save_png(grid, checkpoints.path(workdir, 'images', f'samples_{step:06d}.png'))
    if do_save:
      best = {'neg_swd': -validation['swd']} if validation else None
      store.save(step, parallel.unreplicate(p_states), iterator.get_state(), best)
  store.close()
  log.close()
  return summary
