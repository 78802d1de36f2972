"""Stage-2 training: `train_and_evaluate(config, workdir)` for the DCGAN over stage-1 code maps.

The real code maps are made once at start: stage 1's encoder + codebook over every training slice. A pmapped call
runs config.steps_per_call steps; each runs the generator forward once, updates the discriminator on that batch
(with the R1 penalty on every r1_every-th step; with config.spectral_norm, through its weights divided by their
spectral norms), then the generator (non-saturating or hinge loss) through the same forward pass, with gradients and
batch-norm statistics averaged over devices. Every `sample_every_steps` the generator's samples are rendered and
scored against validation slices (sliced Wasserstein distance, MS-SSIM diversity); WORKDIR/best/ keeps the
checkpoint with the lowest SWD, which sample.py and evaluate use.
"""
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from oasis_jax import checkpoints, images, metrics, ops, parallel, sampling, stage1, timing
from oasis_jax.data import input_pipeline, tfds_oasis
from oasis_jax.errors import UserError, check_choice
from oasis_jax.models import dcgan, spectral_norm, vqvae
from oasis_jax.training import augment, loop

# Fields that define the models: a resumed run must have the same ones.
MODEL_FIELDS = ('head', 'latent_dim', 'generator_width', 'discriminator_width', 'upsample', 'minibatch_std_group',
                'discriminator_input', 'spectral_norm', 'generator_final_convs')
# What a resumed run must share with the run in its workdir.
MUST_MATCH = MODEL_FIELDS + ('vqvae_workdir', 'stage1_model', 'batch_size', 'seed')


class GeneratorState(train_state.TrainState):
  batch_stats: Any
  ema_params: Any   # exponential moving average of params (config.generator_ema; = params when it is 0): sampled


class SpectralDiscriminatorState(train_state.TrainState):
  """The discriminator's state with config.spectral_norm (without it, a plain TrainState, as runs saved before)."""
  spectral: Any     # each weight's power-iteration vector u (spectral_norm.py)


def resolve_data(config, stage1_config) -> ml_collections.ConfigDict:
  """Empty dataset/data_dir/cache_dir fields take the stage-1 run's; vqvae_workdir becomes absolute (sample.py and
  evaluate read it from any directory); `stage1_model` records the stage-1 model fields, so that a stage-1 run
  retrained differently later is caught instead of decoding nonsense."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.vqvae_workdir = os.path.abspath(config.vqvae_workdir)
  for field in ('dataset', 'data_dir', 'cache_dir'):
    if not config[field]:
      config[field] = stage1_config[field]
  config.stage1_model = {field: stage1_config[field] for field in sampling.STAGE1_FIELDS}
  return config


def check_config(config, stage1_config) -> None:
  size = sampling.code_size(stage1_config)
  if size < 8 or size & (size - 1):
    raise UserError(f'{config.vqvae_workdir}: stage-1 code maps are {size}x{size}; the DCGAN needs a power of two >= 8')
  for field in ('latent_dim', 'generator_width', 'discriminator_width', 'num_train_steps', 'batch_size',
                'steps_per_call'):
    if config.get(field, 1) <= 0:
      raise UserError(f'config.{field}={config[field]}: expected a positive number')
  check_choice(config, 'conv_impl', ops.CONV_IMPLS, 'xla')   # runs saved before the field used XLA's
  check_choice(config, 'upsample', vqvae.UPSAMPLE_KINDS)
  if config.head not in ('logits', 'latent'):
    raise UserError(f'config.head={config.head!r}: expected logits (design a) or latent (design b)')
  check_choice(config, 'discriminator_input', ('embedding', 'one_hot'), 'embedding')
  if sees_one_hot(config) and config.head != 'logits':
    raise UserError(f'config.discriminator_input=one_hot: needs config.head=logits (head {config.head!r} makes '
                    f'codebook vectors, not one-hot codes)')
  check_choice(config, 'loss', ('nonsaturating', 'hinge'))
  if config.learning_rate <= 0:
    raise UserError(f'config.learning_rate={config.learning_rate}: expected a positive rate')
  if config.get('discriminator_learning_rate', 0.0) < 0:
    raise UserError(f'config.discriminator_learning_rate={config.discriminator_learning_rate}: expected a positive '
                    f'rate, or 0 for config.learning_rate')
  if config.gumbel_temperature <= 0:
    raise UserError(f'config.gumbel_temperature={config.gumbel_temperature}: expected a positive number')
  for field in ('gumbel_scale', 'sample_gumbel_scale'):
    if config.get(field, 1.0) < 0:
      raise UserError(f'config.{field}={config[field]}: expected a number >= 0 (1 draws codes from '
                      f'softmax(logits), 0 takes their argmax)')
  if config.r1_gamma < 0 or config.minibatch_std_group < 0:
    raise UserError('config.r1_gamma and config.minibatch_std_group: expected numbers >= 0')
  if config.get('r1_every', 1) < 1:
    raise UserError(f'config.r1_every={config.r1_every}: expected a positive number of steps')
  try:
    augment.check_policy(config.get('augment', ''))
  except ValueError as error:
    raise UserError(f'config.augment={config.augment!r}: {error}') from None
  if not 0 <= config.get('augment_translation', 0.125) <= 0.5:
    raise UserError(f'config.augment_translation={config.augment_translation}: expected a fraction in [0, 0.5]')
  if config.get('generator_final_convs', 0) < 0:
    raise UserError(f'config.generator_final_convs={config.generator_final_convs}: expected a number >= 0')
  if config.get('code_histogram_weight', 0.0) < 0:
    raise UserError(f'config.code_histogram_weight={config.code_histogram_weight}: expected a number >= 0')
  check_choice(config, 'code_histogram_scope', ('global', 'position'), 'global')
  if config.get('code_histogram_weight', 0.0) and config.head != 'logits':
    raise UserError(f'config.code_histogram_weight={config.code_histogram_weight}: needs config.head=logits (head '
                    f'{config.head!r} has no code probabilities to match)')
  if not 0 <= config.generator_ema < 1:
    raise UserError(f'config.generator_ema={config.generator_ema}: expected a value in [0, 1)')
  per_device = config.batch_size // max(jax.device_count(), 1)
  if config.minibatch_std_group and per_device % min(config.minibatch_std_group, per_device):
    raise UserError(f'config.minibatch_std_group={config.minibatch_std_group}: expected a divisor of the per-device '
                    f'batch ({per_device})')


def create_states(config, stage1_config, key):
  generator, discriminator = sampling.make_models(config, stage1_config)
  size, d = sampling.code_size(stage1_config), discriminator_channels(config, stage1_config)
  tx = lambda rate: optax.adam(rate, b1=config.beta1)

  def create(key):
    g_key, d_key = jax.random.split(key)
    g_vars = generator.init(g_key, jnp.zeros((2, config.latent_dim)), train=False)
    d_vars = discriminator.init(d_key, jnp.zeros((2, size, size, d)))
    d_state = dict(apply_fn=None, params=d_vars['params'], tx=tx(discriminator_learning_rate(config)))
    if config.get('spectral_norm', False):
      d_state = SpectralDiscriminatorState.create(
          spectral=spectral_norm.init_vectors(d_vars['params'], jax.random.fold_in(d_key, 1)), **d_state)
    else:
      d_state = train_state.TrainState.create(**d_state)
    return (GeneratorState.create(apply_fn=None, params=g_vars['params'], batch_stats=g_vars['batch_stats'],
                                  ema_params=g_vars['params'], tx=tx(config.learning_rate)), d_state)
  return jax.jit(create)(key)


def generator_ema_decay(decay: float, updates):
  """The EMA decay after `updates` generator updates: min(decay, (1 + updates) / (10 + updates)), the warm-up of
  TensorFlow's ExponentialMovingAverage(num_updates), so that the average forgets the initial weights within the
  first few hundred steps instead of keeping decay^t of them (0.999^1000 = 37 %). 0 keeps the live weights."""
  return jnp.minimum(decay, (1.0 + updates) / (10.0 + updates))


def discriminator_learning_rate(config) -> float:
  """The discriminator's Adam rate: config.discriminator_learning_rate, or where that is 0 (or absent, in runs
  saved before the field) the generator's config.learning_rate."""
  return config.get('discriminator_learning_rate', 0.0) or config.learning_rate


def sees_one_hot(config) -> bool:
  """Whether the discriminator sees one-hot codes (config.discriminator_input='one_hot'), else codebook embeddings
  (as runs saved before the field did)."""
  return config.get('discriminator_input', 'embedding') == 'one_hot'


def discriminator_channels(config, stage1_config) -> int:
  """The channels of what the discriminator sees: K (one-hot codes) or D (codebook embeddings)."""
  return stage1_config.num_embeddings if sees_one_hot(config) else stage1_config.embedding_dim


def generated_codes(outputs, codebook, config, gumbel_noise):
  """Generator outputs -> (what the discriminator sees [N, s, s, K or D], codes [N, s, s], head penalty).

  Both heads are straight-through: the forward pass holds one-hot codes (discriminator_input 'one_hot') or
  codebook vectors (head 'latent', or 'embedding') of valid codes only."""
  if config.head == 'logits':
    one_hot, codes = dcgan.gumbel_straight_through(outputs, gumbel_noise, config.gumbel_temperature,
                                                   ops.argmax())
    if sees_one_hot(config):
      return one_hot, codes, 0.0
    return dcgan.embed(one_hot, codebook), codes, 0.0
  quantized, codes = dcgan.quantize_straight_through(outputs, codebook)
  # Keeps the continuous latents near the codebook vectors they stand for (stage 1's commitment term).
  commitment = jnp.mean((outputs - jax.lax.stop_gradient(jnp.take(codebook, codes, axis=0))) ** 2)
  return quantized, codes, config.latent_commitment * commitment


def code_histogram_term(logits, real_counts, weight: float):
  """weight x KL(p_real || p_fake) as the generator sees it: p_real the real code maps' histogram over the global
  batch (real_counts [K], psum-ed), p_fake the generator's expected one, its softmax(logits [n, s, s, K]) averaged
  over the global batch's positions; with real_counts [s, s, K], one histogram per code-map position, the KL at each
  position (p_fake averaged over the batch there), averaged over the positions. Returns (term, kl): a term whose
  gradient is that KL's (its coefficients -p_real / p_fake held at the global p_fake, times this device's average,
  whose gradients pmean averages), so a step is the same on 1 device or on many; kl its value
  (metrics.code_histogram_kl)."""
  k = logits.shape[-1]
  probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  positions = math.prod(real_counts.shape[:-1])   # one, or s * s
  local = jnp.mean(probabilities.reshape(-1, positions, k), axis=0)   # [positions, K]
  real_counts = real_counts.reshape(-1, k)
  p_fake = jax.lax.pmean(jax.lax.stop_gradient(local), parallel.AXIS)
  p_real = real_counts / jnp.sum(real_counts, axis=-1, keepdims=True)
  coefficients = jax.lax.stop_gradient(-p_real / jnp.maximum(p_fake, 1e-12))
  kl = jnp.mean(jax.vmap(metrics.code_histogram_kl)(real_counts, p_fake))
  return weight * jnp.sum(coefficients * local) / positions, kl


def discriminator_loss(real_logits, fake_logits, kind: str):
  if kind == 'hinge':
    return jax.nn.relu(1 - real_logits).mean() + jax.nn.relu(1 + fake_logits).mean()
  return optax.sigmoid_binary_cross_entropy(real_logits, 1.0).mean() + \
      optax.sigmoid_binary_cross_entropy(fake_logits, 0.0).mean()


def generator_loss(fake_logits, kind: str):
  if kind == 'hinge':
    return -fake_logits.mean()
  return optax.sigmoid_binary_cross_entropy(fake_logits, 1.0).mean()  # non-saturating: -log D(G(z))


def train_step(states, real_codes, key, codebook, *, config, generator, discriminator, with_r1: bool = True):
  """One discriminator update, then one generator update on the same generated batch, on this device's shard.

  with_r1: add the R1 penalty, scaled by config.r1_every (lazy regularisation, as in StyleGAN2: the step that
  applies it every r1_every steps stands for all of them); its metric 'r1' is that scaled penalty, 0 without."""
  g_state, d_state = states
  batch, k = real_codes.shape[0], codebook.shape[0]
  # Noise is drawn per global row (key folded with the row's index in the global batch), so a step is the same
  # function of the global batch on 1 device or on many.
  rows = jax.lax.axis_index(parallel.AXIS) * batch + jnp.arange(batch)
  g_key = jax.random.split(key)[0]
  policy = augment.check_policy(config.get('augment', ''))
  augment_key = jax.random.fold_in(key, 7)   # leaves g_key as it is without augmentation

  def seen(embeddings, use):   # what the discriminator sees: DiffAugment's transforms, the same for real and fake
    return augment.augment(embeddings, jax.random.fold_in(augment_key, use), rows, policy,
                           config.get('augment_translation', 0.125))

  real_counts = jax.lax.psum(jnp.bincount(real_codes.reshape(-1), length=k), parallel.AXIS)
  histogram_weight = config.get('code_histogram_weight', 0.0)
  if histogram_weight and config.get('code_histogram_scope', 'global') == 'position':   # [s, s, K]
    histograms = jax.lax.psum(jnp.sum(jax.nn.one_hot(real_codes, k, dtype=jnp.float32), axis=0), parallel.AXIS)
  else:
    histograms = real_counts

  def generate(g_params):
    z_key, gumbel_key = jax.random.split(g_key)
    z = sampling.per_row_noise(z_key, rows, lambda k_: jax.random.normal(k_, (config.latent_dim,)))
    outputs, updates = generator.apply({'params': g_params, 'batch_stats': g_state.batch_stats}, z, train=True,
                                       mutable=['batch_stats'])
    gumbel = sampling.scaled_gumbel_noise(gumbel_key, rows, outputs.shape[1:], config.get('gumbel_scale', 1.0),
                                          outputs.dtype)
    fake, codes, penalty = generated_codes(outputs, codebook, config, gumbel)
    histogram_kl = 0.0
    if histogram_weight:
      term, histogram_kl = code_histogram_term(outputs, histograms, histogram_weight)
      penalty = penalty + term
    return (fake, jnp.asarray(penalty, fake.dtype)), (codes, updates['batch_stats'], histogram_kl)

  # One generator pass serves both updates: its fakes train D (as constants), then its VJP carries the generator
  # loss under the updated D back to G's parameters.
  (fake, penalty), g_vjp, (codes, batch_stats, histogram_kl) = jax.vjp(generate, g_state.params, has_aux=True)
  if sees_one_hot(config):
    real = seen(jax.nn.one_hot(real_codes, k, dtype=codebook.dtype), 1)
  else:
    real = seen(jnp.take(codebook, real_codes, axis=0), 1)   # = one_hot(real codes) @ codebook

  # Spectral normalisation: one power iteration per step; D's weights enter every apply below divided by their
  # estimated largest singular value (the gradient flows through the division), before and after D's update.
  spectral = isinstance(d_state, SpectralDiscriminatorState)
  estimates = spectral_norm.power_iteration(d_state.params, d_state.spectral) if spectral else {}
  weights = lambda d_params: spectral_norm.normalize(d_params, estimates) if spectral else d_params

  def d_loss_fn(d_params):
    apply = lambda x: discriminator.apply({'params': weights(d_params)}, x)
    real_logits, fake_logits = apply(real), apply(seen(fake, 0))
    loss = discriminator_loss(real_logits, fake_logits, config.loss)
    r1 = 0.0
    if config.r1_gamma > 0 and with_r1:   # R1 (Mescheder et al. 2018): gradient penalty on real inputs
      grads = jax.grad(lambda x: apply(x).sum())(real)
      r1 = jnp.mean(jnp.sum(grads ** 2, axis=(1, 2, 3)))
      r1_every = config.get('r1_every', 1)
      r1 = r1 * r1_every if r1_every > 1 else r1
    return loss + config.r1_gamma / 2 * r1, (loss, r1, jax.nn.sigmoid(real_logits).mean(),
                                             jax.nn.sigmoid(fake_logits).mean())

  (_, (d_loss, r1, d_real, d_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_state.params)
  d_state = d_state.apply_gradients(grads=jax.lax.pmean(d_grads, parallel.AXIS))
  if spectral:   # the same on every device: the replicas' weights and vectors are equal
    d_state = d_state.replace(spectral={path: u for path, (u, _) in estimates.items()})

  fake_loss = lambda fake_: generator_loss(discriminator.apply({'params': weights(d_state.params)}, seen(fake_, 2)),
                                           config.loss)
  g_loss, fake_grad = jax.value_and_grad(fake_loss)(fake)
  g_grads, = g_vjp((fake_grad, jnp.ones_like(penalty)))
  g_state = g_state.apply_gradients(grads=jax.lax.pmean(g_grads, parallel.AXIS)).replace(batch_stats=batch_stats)
  decay = generator_ema_decay(config.generator_ema, g_state.step)
  g_state = g_state.replace(ema_params=optax.incremental_update(g_state.params, g_state.ema_params, 1.0 - decay))
  fake_counts = jax.lax.psum(jnp.bincount(codes.reshape(-1), length=k), parallel.AXIS)
  step_metrics = jax.lax.pmean({'d_loss': d_loss, 'g_loss': g_loss, 'd_real': d_real, 'd_fake': d_fake, 'r1': r1},
                               parallel.AXIS)
  if histogram_weight:
    step_metrics['histogram_kl'] = histogram_kl
  step_metrics['codes_used'] = jnp.sum(fake_counts > 0)
  step_metrics['code_kl'] = metrics.code_histogram_kl(real_counts, fake_counts)
  return (g_state, d_state), step_metrics


def train_steps(states, real_codes, keys, codebook, *, config, generator, discriminator, with_r1: tuple):
  """len(with_r1) consecutive train_steps in one call (real_codes [steps, per-device batch, s, s], keys [steps]),
  unrolled (loop.unrolled), the i-th with the R1 penalty where with_r1[i]; returns the states and each metric
  stacked over the steps. Each form of the step (with and without R1) is traced once for all the steps of a call."""
  step = {r1: jax.jit(functools.partial(train_step, config=config, generator=generator, discriminator=discriminator,
                                        with_r1=r1)) for r1 in set(with_r1)}
  return loop.unrolled(states, [(step[r1], (real_codes[i], keys[i], codebook)) for i, r1 in enumerate(with_r1)])


def train_calls(config, generator, discriminator):
  """pattern -> the pmapped call of train_steps for a call whose steps have that R1 pattern (r1_pattern), built on
  first use: (replicated states, codes [devices, steps, per-device batch, s, s], keys [steps], codebook) ->
  (states, metrics [devices, steps]). With steps_per_call dividing r1_every and the intervals, two patterns occur."""
  calls = {}

  def call(pattern: tuple):
    if pattern not in calls:
      calls[pattern] = jax.pmap(
          functools.partial(train_steps, config=config, generator=generator, discriminator=discriminator,
                            with_r1=pattern),
          axis_name=parallel.AXIS, donate_argnums=(0,), in_axes=(0, 0, None, None))
    return calls[pattern]
  return call


def r1_pattern(config, first: int, last: int) -> tuple:
  """Which of the steps first..last add the (lazy) R1 penalty: every r1_every-th step, none when r1_gamma is 0."""
  return tuple(config.r1_gamma > 0 and step % config.get('r1_every', 1) == 0 for step in range(first, last + 1))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains stage 2 in workdir (resuming from its latest checkpoint); returns the last train-metrics summary."""
  parallel.use_cpu_devices(config.get('cpu_devices', 0), config.batch_size)   # before JAX starts
  phases = timing.Phases()
  with phases('setup'):
    stage1_run = stage1.load(config.vqvae_workdir)
  config = resolve_data(config, stage1_run[2])
  check_config(config, stage1_run[2])
  checkpoints.check_resumable(workdir, config, checkpoints.STAGE2, MUST_MATCH)
  with checkpoints.lock(workdir):   # a second run on the workdir stops here, before it writes anything
    checkpoints.write_config(workdir, config, checkpoints.STAGE2, MUST_MATCH)
    with phases('setup'):   # trains (and resumes) on the stage 1 it first saw, whatever happens to that workdir later
      stage1_run = stage1.load(stage1.pin(workdir, config.vqvae_workdir))
    return _train(config, workdir, stage1_run, phases)


def _train(config: ml_collections.ConfigDict, workdir: str, stage1_run, phases: timing.Phases) -> dict:
  stage1_model, stage1_variables, stage1_config = stage1_run
  sharding = input_pipeline.current_sharding(config.batch_size, stage1_config.image_size)
  with phases('data'):
    builder = parallel.main_process_first(
        lambda: tfds_oasis.prepare(config.dataset, config.data_dir, config.cache_dir))
    train_source = builder.as_data_source('train')
    if len(train_source) < config.batch_size:
      raise UserError(f'config.batch_size={config.batch_size}: larger than the training split '
                      f'({len(train_source)})')
    print(f'[gan] encoding {len(train_source)} training slices with stage 1 ({config.vqvae_workdir})', flush=True)
    real_maps = stage1.encode_split(stage1_model, stage1_variables, train_source, stage1_config.image_size)
    validation_images = input_pipeline.load_images(builder.as_data_source('validate'), stage1_config.image_size,
                                                    config.eval_images)
  codebook = jnp.asarray(stage1_variables['vq']['codebook'])

  with phases('setup'):
    states = create_states(config, stage1_config, jax.random.key(config.seed))
    iterator = input_pipeline.code_map_iterator(real_maps, sharding, config.seed)
  generator, discriminator = sampling.make_models(config, stage1_config, axis_name=parallel.AXIS)
  p_train_steps = train_calls(config, generator, discriminator)
  sampler = sampling.make_sampler(sampling.make_models(config, stage1_config)[0], stage1_model, config.head,
                                  sampling.sample_gumbel_scale(config))
  base_key = jax.random.key(config.seed + 1)

  def run_steps(p_states, first, last):
    codes = np.stack([next(iterator) for _ in range(first, last + 1)], axis=1)
    keys = jnp.stack([jax.random.fold_in(base_key, step) for step in range(first, last + 1)])
    return p_train_steps(r1_pattern(config, first, last))(p_states, codes, keys, codebook)

  def evaluate(step, p_states):
    g_state = parallel.unreplicate(p_states[0])
    samples, _ = sampling.generate(sampler, sampling.sampling_variables(g_state), stage1_variables,
                                   config.eval_samples, config.latent_dim, config.seed + 2)
    validation = {'swd': metrics.swd(samples, validation_images)['mean'],
                  'ms_ssim': metrics.ms_ssim_diversity(samples, max_pairs=256)}
    return loop.Evaluation(validation, {'neg_swd': -validation['swd']}, images.grid(samples[:16], columns=8),
                           'samples', f'samples_{step:06d}.png')

  cadence = loop.Cadence(config.log_every_steps, config.sample_every_steps, config.checkpoint_every_steps,
                         config.get('steps_per_call', 1))
  describe = (f'{config.num_train_steps} steps, global batch {config.batch_size} on {jax.device_count()} '
              f'device(s), code maps {real_maps.shape[1]}x{real_maps.shape[2]} over K={stage1_config.num_embeddings}, '
              f'head {config.head}')
  summary, _ = loop.train('gan', workdir, states, iterator, config.num_train_steps, cadence, 'neg_swd', run_steps,
                          evaluate, describe, phases)
  phases.write(workdir, 'train_gan')
  return summary
