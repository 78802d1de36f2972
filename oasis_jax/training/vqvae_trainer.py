"""Stage-1 training: `train_and_evaluate(config, workdir)` and its pmapped train step (the loop is training/loop.py)."""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from oasis_jax import checkpoints, metrics, ops, parallel, stage1, timing
from oasis_jax.data import input_pipeline, tfds_oasis
from oasis_jax.errors import UserError, check_choice
from oasis_jax.models import vqvae
from oasis_jax.training import loop

# Fields that define the model and its data: a resumed run must have the same ones.
MODEL_FIELDS = ('image_size', 'num_hiddens', 'num_residual_layers', 'num_residual_hiddens', 'embedding_dim',
                'num_embeddings', 'num_downsamples', 'upsample')
EVENT_INTERVALS = ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps')
# What a resumed run must share with the run in its workdir.
MUST_MATCH = MODEL_FIELDS + ('dataset', 'batch_size', 'seed', 'lr_schedule', 'decoder_steps')


class TrainState(train_state.TrainState):
  vq: Any  # the codebook state (vqvae.VQ collection): updated by EMA, not by the optimiser


def check_config(config: ml_collections.ConfigDict) -> None:
  """One clear line for values that cannot work."""
  if config.num_embeddings < 2:
    raise UserError(f'config.num_embeddings={config.num_embeddings}: expected at least 2 codes')
  for field in ('num_hiddens', 'embedding_dim', 'num_residual_hiddens', 'num_downsamples'):
    if config[field] <= 0:
      raise UserError(f'config.{field}={config[field]}: expected a positive number')
  if config.image_size % 2 ** config.num_downsamples:
    raise UserError(f'config.image_size={config.image_size}: expected a multiple of 2**num_downsamples')
  if not 0 < config.ema_decay < 1:
    raise UserError(f'config.ema_decay={config.ema_decay}: expected a value in (0, 1)')
  check_choice(config, 'lr_schedule', ('constant', 'cosine'))
  if config.learning_rate <= 0:
    raise UserError(f'config.learning_rate={config.learning_rate}: expected a positive number')
  check_choice(config, 'upsample', vqvae.UPSAMPLE_KINDS)
  if not 0 <= config.clip_margin <= 1:
    raise UserError(f'config.clip_margin={config.clip_margin}: expected a value in [0, 1]')
  if config.get('ssim_weight', 0.0) < 0:
    raise UserError(f'config.ssim_weight={config.ssim_weight}: expected a number >= 0')
  check_choice(config, 'best_metric', ('ssim', 'psnr'))
  check_choice(config, 'conv_impl', ops.CONV_IMPLS)
  check_choice(config, 'dtype', ('float32', 'bfloat16'))
  for field in ('steps_per_call',) + EVENT_INTERVALS:
    if config[field] <= 0:
      raise UserError(f'config.{field}={config[field]}: expected a positive number')
  for field in ('decoder_steps', 'decoder_learning_rate'):
    if config[field] < 0:
      raise UserError(f'config.{field}={config[field]}: expected a number >= 0 (0: no decoder phase, or for the '
                      f'rate config.learning_rate)')


def learning_rate(config, total_steps: int):
  """config.lr_schedule: 'constant' (Adam 1e-3 in the default recipe) or 'cosine' (see `cosine`)."""
  if config.lr_schedule == 'constant':
    return config.learning_rate
  return cosine(config.learning_rate, total_steps)


def cosine(rate: float, total_steps: int):
  """A linear warm-up over the first 2 % of the steps, then cosine decay to 1 % of the rate at total_steps."""
  return optax.warmup_cosine_decay_schedule(0.0, rate, max(1, total_steps // 50), total_steps, rate * 0.01)


def schedule(config, joint_steps: int):
  """The rate at each step: the joint steps' (config.lr_schedule), then, with config.decoder_steps > 0, the decoder
  phase's: `cosine` over its steps at config.decoder_learning_rate (0: config.learning_rate)."""
  joint = learning_rate(config, joint_steps)
  if not config.decoder_steps:
    return joint
  decoder = cosine(config.decoder_learning_rate or config.learning_rate, config.decoder_steps)
  return optax.join_schedules([joint if callable(joint) else optax.constant_schedule(joint), decoder], [joint_steps])


def create_state(config, key, joint_steps: int = 0) -> TrainState:
  """The initial state: model parameters, codebook state and Adam state (one compiled computation)."""
  model = stage1.model_from_config(config)
  rates = schedule(config, joint_steps or max(config.num_train_steps, 1))

  def create(key):
    variables = model.init(key, jnp.zeros((1, config.image_size, config.image_size, 1), jnp.float32))
    return TrainState.create(apply_fn=model.apply, params=variables['params'], vq=variables[vqvae.VQ],
                             tx=optax.adam(rates))
  return jax.jit(create)(key)


def reconstruction_error(reconstruction, batch, clip_margin: float = 0.0):
  """reconstruction - batch, where clip_margin > 0 forgives what rendering (clipping to [0, 1]) makes exact: on
  black pixels (0) outputs in [-clip_margin, 0], on white ones (1) outputs in [1, 1 + clip_margin]. The black
  background around the brain can then come out exactly black, not a faint haze; the margin keeps it near 0, so
  that the edge of the brain stays a short step."""
  error = reconstruction - batch
  if not clip_margin:
    return error
  black = jnp.maximum(error, 0) + jnp.minimum(error + clip_margin, 0)
  white = jnp.minimum(error, 0) + jnp.maximum(error - clip_margin, 0)
  return jnp.where(batch <= 0, black, jnp.where(batch >= 1, white, error))


def image_loss(reconstruction, batch, config, data_variance: float):
  """The reconstruction term: the squared error (config.clip_margin) over the data variance, plus
  config.ssim_weight x (1 - SSIM) of the rendered reconstruction (clipped to [0, 1], as evaluation sees it) when
  the weight is > 0. SSIM compares local means, contrasts and structure in 11x11 windows: it charges a blurred gyrus
  more than the squared error does."""
  error = reconstruction_error(reconstruction, batch, config.get('clip_margin', 0.0))
  loss = jnp.mean(error ** 2) / data_variance
  weight = config.get('ssim_weight', 0.0)
  if weight:
    rendered = jnp.clip(reconstruction.astype(jnp.float32), 0, 1)
    loss = loss + weight * (1 - jnp.mean(metrics.ssim_differentiable(rendered, batch)))
  return loss


def train_step(state: TrainState, batch, key, *, config, data_variance: float, decoder_only: bool = False):
  """One step on this device's shard of the global batch; gradients are pmean-ed and code statistics psum-ed.

  decoder_only (the decoder phase, config.decoder_steps): the same loss differentiated for the decoder's parameters
  alone; the encoder's and the codebook stay as they are, and so do the codes."""

  def loss_fn(trainable):
    params = {**state.params, 'decoder': trainable} if decoder_only else trainable
    reconstruction, z, quantized, codes = state.apply_fn({'params': params, vqvae.VQ: state.vq}, batch)
    reconstruction_loss = image_loss(reconstruction, batch, config, data_variance)
    commitment_loss = jnp.mean((z - jax.lax.stop_gradient(quantized)) ** 2)
    return reconstruction_loss + config.commitment_cost * commitment_loss, (reconstruction_loss, commitment_loss, z, codes)

  trainable = state.params['decoder'] if decoder_only else state.params
  (loss, (reconstruction_loss, commitment_loss, z, codes)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      trainable)
  grads = jax.lax.pmean(grads, parallel.AXIS)
  vectors = z.reshape(-1, z.shape[-1])
  counts, sums = vqvae.code_statistics(codes.reshape(-1), vectors, config.num_embeddings)
  counts, sums = jax.lax.psum((counts, sums), parallel.AXIS)
  if decoder_only:
    # Adam's momentum would still move the encoder under zero gradients: keep its parameters as they are.
    updated = state.apply_gradients(grads={**jax.tree.map(jnp.zeros_like, state.params), 'decoder': grads})
    state = updated.replace(params={**state.params, 'decoder': updated.params['decoder']})
    restarted = jnp.zeros((), jnp.int32)
  else:
    vq = vqvae.ema_update(state.vq, counts, sums, config.ema_decay, config.ema_epsilon)
    candidates = parallel.global_row_sample(vectors, key, config.num_embeddings)
    vq, restarted = vqvae.restart_dead_codes(vq, candidates, config.ema_decay, config.dead_code_fraction)
    state = state.apply_gradients(grads=grads).replace(vq=vq)
  step_metrics = jax.lax.pmean({'loss': loss, 'reconstruction': reconstruction_loss, 'commitment': commitment_loss},
                               parallel.AXIS)
  step_metrics.update(perplexity=vqvae.perplexity(counts), codes_used=jnp.sum(counts > 0), restarted=restarted)
  return state, step_metrics


def train_steps(state: TrainState, batches, keys, *, config, data_variance: float, decoder_only: bool = False):
  """len(keys) consecutive train_steps in one call (batches: [steps, per-device batch, ...]), unrolled
  (loop.unrolled); returns the state and each metric stacked over the steps."""
  step = jax.jit(functools.partial(train_step, config=config, data_variance=data_variance, decoder_only=decoder_only))
  return loop.unrolled(state, [(step, (batches[i], keys[i])) for i in range(keys.shape[0])])


def decoder_phase_start(p_state, workdir: str):
  """The decoder phase's first state: the encoder and codebook of the run's best checkpoint (the joint steps' best
  by validation metric, what stage 2 would take without the phase), not the last joint step's, which at a constant
  rate can be a worse one; Adam's moments afresh (the joint steps' would damp the phase's updates for its first
  thousand steps: beta2 = 0.999); the decoder and the step count go on. Every later best checkpoint holds the same
  encoder and codebook, so a run resumed at the phase's start gets the same state. Without a best checkpoint, only
  the moments are new."""
  state = jax.device_get(parallel.unreplicate(p_state))
  best = checkpoints.path(workdir, 'best')
  if checkpoints.latest_complete_step(best) is not None:
    saved, step = checkpoints.restore_raw(best, 'stage-1 (best)')
    print(f'[vqvae] the decoder phase: the encoder and codebook of the best checkpoint (step {step})', flush=True)
    state = state.replace(params={**state.params, 'encoder': saved['params']['encoder']}, vq=saved[vqvae.VQ])
  fresh = lambda part: (part._replace(count=np.zeros_like(part.count), mu=jax.tree.map(np.zeros_like, part.mu),
                                     nu=jax.tree.map(np.zeros_like, part.nu))
                        if isinstance(part, optax.ScaleByAdamState) else part)
  return parallel.replicate(state.replace(opt_state=tuple(fresh(part) for part in state.opt_state)))


def data_variance(source, image_size: int, sample: int = 512) -> float:
  """Variance of training pixel values in [0, 1] over up to `sample` evenly spaced slices: the reconstruction
  loss's normaliser, as in the VQ-VAE paper's and Sonnet's examples."""
  return float(np.var(input_pipeline.load_images(source, image_size, sample)))


def num_steps(config, train_size: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  steps = config.num_epochs * train_size // config.batch_size
  if steps <= 0:
    raise UserError(f'config.num_epochs={config.num_epochs}, config.num_train_steps={config.num_train_steps}: '
                    'expected a positive number of steps')
  return steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains stage 1 in workdir (resuming from its latest checkpoint) and returns the last validation metrics."""
  check_config(config)
  must_match, why = MUST_MATCH, {'decoder_steps': "the decoder phase's schedule is laid out over its length"}
  if config.lr_schedule == 'cosine':   # laid out over the run's length: a longer run would raise the rate again
    must_match += ('num_train_steps', 'num_epochs')
    why.update(dict.fromkeys(('num_train_steps', 'num_epochs'), "the cosine learning-rate schedule is laid out over "
                             "the run's length; extending it would raise the learning rate at the resume point"))
  elif config.decoder_steps:   # the decoder phase begins where the joint steps end
    must_match += ('num_train_steps', 'num_epochs')
    why.update(dict.fromkeys(('num_train_steps', 'num_epochs'), 'the decoder phase begins where the joint steps '
                             'end'))
  checkpoints.check_resumable(workdir, config, checkpoints.STAGE1, must_match, why)
  with checkpoints.lock(workdir):   # a second run on the workdir stops here, before it writes anything
    checkpoints.write_config(workdir, config, checkpoints.STAGE1, must_match, why)
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  phases = timing.Phases()
  sharding = input_pipeline.current_sharding(config.batch_size, config.image_size)
  with phases('data'):
    builder = parallel.main_process_first(
        lambda: tfds_oasis.prepare(config.dataset, config.data_dir, config.cache_dir))
    train_source, validate_source = builder.as_data_source('train'), builder.as_data_source('validate')
    joint_steps = num_steps(config, len(train_source))
    total_steps = joint_steps + config.decoder_steps
    variance = data_variance(train_source, config.image_size)

  with phases('setup'):
    state = create_state(config, jax.random.key(config.seed), joint_steps)
    iterator = input_pipeline.train_iterator(train_source, sharding, config.seed)
  # The joint steps' call and the decoder phase's (calls end where the phase begins: cadence below).
  p_train_steps = {decoder_only: jax.pmap(
      functools.partial(train_steps, config=config, data_variance=variance, decoder_only=decoder_only),
      axis_name=parallel.AXIS, donate_argnums=(0,), in_axes=(0, 0, None)) for decoder_only in (False, True)}
  p_eval_step = stage1.make_eval_step(stage1.model_from_config(config), config.num_embeddings)
  base_key = jax.random.key(config.seed + 1)

  def run_steps(p_state, first, last):
    if first == joint_steps + 1 and config.decoder_steps:
      p_state = decoder_phase_start(p_state, workdir)
    batches = np.stack([next(iterator) for _ in range(first, last + 1)], axis=1)
    keys = jnp.stack([jax.random.fold_in(base_key, s) for s in range(first, last + 1)])
    return p_train_steps[first > joint_steps](p_state, batches, keys)

  def evaluate(step, p_state):
    p_variables = {'params': p_state.params, vqvae.VQ: p_state.vq}
    validation, (originals, reconstructions) = stage1.evaluate_split(p_eval_step, p_variables, validate_source,
                                                                     sharding, config.max_eval_images)
    return loop.Evaluation(validation, validation, stage1.comparison_grid(originals, reconstructions),
                           'validate/originals_over_reconstructions', f'reconstructions_{step:06d}.png')

  cadence = loop.Cadence(config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps,
                         config.steps_per_call, ends=(joint_steps,))
  phase = f' + {total_steps - joint_steps} of the decoder alone' if total_steps > joint_steps else ''
  describe = (f'{joint_steps} steps{phase}, global batch {config.batch_size} on {jax.device_count()} device(s), '
              f'{len(train_source)} train slices, data variance {variance:.4f}')
  _, validation = loop.train('vqvae', workdir, state, iterator, total_steps, cadence, config.best_metric, run_steps,
                             evaluate, describe, phases)
  phases.write(workdir, 'train_vqvae')
  return validation
