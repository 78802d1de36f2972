"""Stage-2 training: `train_and_evaluate(config, workdir)` for the DCGAN over stage-1 code maps.

The real code maps are made once at start: stage 1's encoder + codebook over every training slice. Each pmapped step
updates the discriminator, then the generator (non-saturating GAN loss), with gradients and batch-norm statistics
averaged over devices.
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

from oasis_jax import checkpoints, dcgan, images, input_pipeline, parallel, progress, tfds_oasis, vqvae
from oasis_jax.errors import UserError

STAGE = 'gan'


class GeneratorState(train_state.TrainState):
  batch_stats: Any


def code_size(stage1_config) -> int:
  return stage1_config.image_size // 2 ** stage1_config.num_downsamples


def resolve_data(config, stage1_config) -> ml_collections.ConfigDict:
  """Empty dataset/data_dir/cache_dir fields take the stage-1 run's."""
  config = ml_collections.ConfigDict(config.to_dict())
  for field in ('dataset', 'data_dir', 'cache_dir'):
    if not config[field]:
      config[field] = stage1_config[field]
  return config


def check_config(config, stage1_config) -> None:
  size = code_size(stage1_config)
  if size < 8 or size & (size - 1):
    raise UserError(f'{config.vqvae_workdir}: stage-1 code maps are {size}x{size}; the DCGAN needs a power of two >= 8')
  for field in ('latent_dim', 'generator_width', 'discriminator_width', 'num_train_steps'):
    if config[field] <= 0:
      raise UserError(f'config.{field}={config[field]}: expected a positive number')
  if config.gumbel_temperature <= 0:
    raise UserError(f'config.gumbel_temperature={config.gumbel_temperature}: expected a positive number')


def make_models(config, stage1_config, axis_name=None):
  size = code_size(stage1_config)
  return (dcgan.Generator(size, stage1_config.num_embeddings, config.generator_width, config.upsample, axis_name),
          dcgan.Discriminator(size, config.discriminator_width))


def create_states(config, stage1_config, key):
  generator, discriminator = make_models(config, stage1_config)
  size, k, d = code_size(stage1_config), stage1_config.num_embeddings, stage1_config.embedding_dim
  tx = lambda: optax.adam(config.learning_rate, b1=config.beta1)

  def create(key):
    g_key, d_key = jax.random.split(key)
    g_vars = generator.init(g_key, jnp.zeros((2, config.latent_dim)), train=False)
    d_vars = discriminator.init(d_key, jnp.zeros((1, size, size, d)))
    return (GeneratorState.create(apply_fn=None, params=g_vars['params'], batch_stats=g_vars['batch_stats'], tx=tx()),
            train_state.TrainState.create(apply_fn=None, params=d_vars['params'], tx=tx()))
  del k
  return jax.jit(create)(key)


def train_step(states, real_codes, key, codebook, *, config, generator, discriminator):
  """One discriminator update, then one generator update, on this device's shard of the batch."""
  g_state, d_state = states
  batch, k = real_codes.shape[0], codebook.shape[0]
  # Noise is drawn per global row (key folded with the row's index in the global batch), so a step is the same
  # function of the global batch on 1 device or on many.
  rows = jax.lax.axis_index(parallel.AXIS) * batch + jnp.arange(batch)
  per_row = lambda key, draw: jax.vmap(lambda row: draw(jax.random.fold_in(key, row)))(rows)
  d_key, g_key = jax.random.split(key)

  def generate(g_params, key):
    z_key, gumbel_key = jax.random.split(key)
    z = per_row(z_key, lambda k_: jax.random.normal(k_, (config.latent_dim,)))
    logits, updates = generator.apply({'params': g_params, 'batch_stats': g_state.batch_stats}, z, train=True,
                                      mutable=['batch_stats'])
    gumbel = per_row(gumbel_key, lambda k_: jax.random.gumbel(k_, logits.shape[1:], logits.dtype))
    one_hot, codes = dcgan.gumbel_straight_through(logits, gumbel, config.gumbel_temperature)
    return dcgan.embed(one_hot, codebook), codes, updates['batch_stats']

  fake, _, _ = generate(g_state.params, d_key)
  real = dcgan.embed(jax.nn.one_hot(real_codes, k), codebook)

  def d_loss_fn(d_params):
    real_logits = discriminator.apply({'params': d_params}, real)
    fake_logits = discriminator.apply({'params': d_params}, jax.lax.stop_gradient(fake))
    loss = optax.sigmoid_binary_cross_entropy(real_logits, 1.0).mean() + \
        optax.sigmoid_binary_cross_entropy(fake_logits, 0.0).mean()
    return loss, (jax.nn.sigmoid(real_logits).mean(), jax.nn.sigmoid(fake_logits).mean())

  (d_loss, (d_real, d_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_state.params)
  d_state = d_state.apply_gradients(grads=jax.lax.pmean(d_grads, parallel.AXIS))

  def g_loss_fn(g_params):
    fake, codes, batch_stats = generate(g_params, g_key)
    logits = discriminator.apply({'params': d_state.params}, fake)
    return optax.sigmoid_binary_cross_entropy(logits, 1.0).mean(), (batch_stats, codes)

  (g_loss, (batch_stats, codes)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_state.params)
  g_state = g_state.apply_gradients(grads=jax.lax.pmean(g_grads, parallel.AXIS)).replace(batch_stats=batch_stats)
  fake_counts = jax.lax.psum(jnp.bincount(codes.reshape(-1), length=k), parallel.AXIS)
  real_counts = jax.lax.psum(jnp.bincount(real_codes.reshape(-1), length=k), parallel.AXIS)
  step_metrics = jax.lax.pmean({'d_loss': d_loss, 'g_loss': g_loss, 'd_real': d_real, 'd_fake': d_fake},
                               parallel.AXIS)
  step_metrics['codes_used'] = jnp.sum(fake_counts > 0)
  step_metrics['code_kl'] = code_histogram_kl(real_counts, fake_counts)
  return (g_state, d_state), step_metrics


def code_histogram_kl(real_counts, fake_counts, epsilon: float = 1e-6):
  """KL(real || generated) between code-usage histograms (smoothed by epsilon)."""
  p = real_counts / real_counts.sum() + epsilon
  q = fake_counts / fake_counts.sum() + epsilon
  p, q = p / p.sum(), q / q.sum()
  return jnp.sum(p * jnp.log(p / q))


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


def make_sampler(generator, stage1_model):
  """(g_variables, stage1_variables, z) -> (images [N, S, S, 1] in [0, 1], codes [N, s, s])."""

  def sample(g_variables, stage1_variables, z):
    logits = generator.apply(g_variables, z, train=False)
    codes = dcgan.sample_codes(logits)
    decoded = stage1_model.apply(stage1_variables, codes, method=vqvae.VQVAE.decode_codes)
    return jnp.clip(decoded, 0, 1), codes
  return jax.jit(sample)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains stage 2 in workdir (resuming from its latest checkpoint)."""
  stage1_model, stage1_variables, stage1_config = checkpoints.load_stage1(config.vqvae_workdir)
  config = resolve_data(config, stage1_config)
  check_config(config, stage1_config)
  sharding = input_pipeline.current_sharding(config.batch_size, stage1_config.image_size)
  checkpoints.write_config(workdir, config, STAGE, must_match=('vqvae_workdir', 'latent_dim', 'generator_width',
                                                               'discriminator_width', 'upsample', 'batch_size', 'seed'))
  builder = tfds_oasis.prepare(config.dataset, config.data_dir, config.cache_dir)
  train_source = builder.as_data_source('train')
  if len(train_source) < config.batch_size:
    raise UserError(f'config.batch_size={config.batch_size}: larger than the training split ({len(train_source)})')
  print(f'[gan] encoding {len(train_source)} training slices with stage 1 ({config.vqvae_workdir})', flush=True)
  real_maps = encode_split(stage1_model, stage1_variables, train_source, stage1_config.image_size)
  codebook = jnp.asarray(stage1_variables['vq']['codebook'])

  states = create_states(config, stage1_config, jax.random.key(config.seed))
  iterator = code_batches(real_maps, sharding, config.seed)
  store = checkpoints.Checkpoints(workdir, best_metric='neg_code_kl')
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
  sampler = make_sampler(make_models(config, stage1_config)[0], stage1_model)
  fixed_z = jax.random.normal(jax.random.key(config.seed + 2), (16, config.latent_dim))
  log = progress.Progress(workdir, config.num_train_steps, start_step, 'gan')
  print(f'[gan] {config.num_train_steps} steps, global batch {config.batch_size} on {jax.device_count()} device(s), '
        f'code maps {real_maps.shape[1]}x{real_maps.shape[2]} over K={stage1_config.num_embeddings}', flush=True)
  base_key = jax.random.key(config.seed + 1)
  history, summary = [], {}
  for step in range(start_step + 1, config.num_train_steps + 1):
    p_states, step_metrics = p_train_step(p_states, next(iterator), jax.random.fold_in(base_key, step), codebook)
    history.append(step_metrics)
    is_last = step == config.num_train_steps
    if step % config.log_every_steps == 0 or is_last:
      summary = {k: float(np.mean([m[k][0] for m in jax.device_get(history)])) for k in history[0]}
      history = []
      if not np.all(np.isfinite(list(summary.values()))):
        store.close()
        raise UserError(f'non-finite GAN loss at step {step}: stopped; the last good checkpoint '
                        f'(step {store.latest_step()}) is kept. Try a lower config.learning_rate')
      log.report(step, summary)
    if step % config.sample_every_steps == 0 or is_last:
      g_state = parallel.unreplicate(p_states[0])
      samples, _ = sampler({'params': g_state.params, 'batch_stats': g_state.batch_stats}, stage1_variables, fixed_z)
      grid = images.grid(np.asarray(samples), columns=8)
      log.image(step, 'samples', grid)
      if parallel.is_main_process():
        images.save_png(grid, checkpoints.path(workdir, 'images', f'samples_{step:06d}.png'))
    if step % config.checkpoint_every_steps == 0 or is_last:
      metrics = {'neg_code_kl': -summary['code_kl']} if summary else None
      store.save(step, parallel.unreplicate(p_states), iterator.get_state(), metrics)
  store.close()
  log.close()
  return summary
