"""Generation, in one place: stage 2's models built from a config, per-row noise, the sampler (generator -> code
map -> stage-1 decoder), `generate`, loading a trained generator (`load`) and writing samples as PNGs.

Stage-2 training, evaluation and sample.py all import these; nothing here imports a trainer."""
import functools
import os
import re
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from oasis_jax import checkpoints, images, ops, stage1
from oasis_jax.errors import UserError
from oasis_jax.models import dcgan, vqvae

# The stage-1 fields a stage-2 run depends on (recorded in its config as `stage1_model`).
STAGE1_FIELDS = ('image_size', 'num_downsamples', 'num_embeddings', 'embedding_dim')


def code_size(stage1_config) -> int:
  """s: stage 1's code maps are s x s."""
  return stage1_config.image_size // 2 ** stage1_config.num_downsamples


def make_models(config, stage1_config, axis_name=None):
  """(Generator, Discriminator) of a stage-2 config over a stage-1 config's code maps, with the convolution form
  `ops.layers(config.conv_impl)` picks for this backend. axis_name: the pmap axis over which the generator averages
  batch-norm statistics in training (None to sample)."""
  out = stage1_config.num_embeddings if config.head == 'logits' else stage1_config.embedding_dim
  conv = ops.layers(config.get('conv_impl', 'xla'))['conv']   # runs saved before the field existed used XLA's
  size = code_size(stage1_config)
  return (dcgan.Generator(size, out, config.generator_width, config.upsample, axis_name, conv,
                          config.get('generator_final_convs', 0)),
          dcgan.Discriminator(size, config.discriminator_width, config.minibatch_std_group, conv))


def per_row_noise(key, rows, draw):
  """draw(fold_in(key, row)) for each global row index: the same noise for a row on 1 device or on many."""
  return jax.vmap(lambda row: draw(jax.random.fold_in(key, row)))(rows)


def gumbel_noise(key, rows, shape, dtype=jnp.float32):
  """Gumbel(0, 1) noise [len(rows), *shape], one stream per global row index, as per_row_noise draws it: the same
  noise for a row on 1 device or on many.

  Each row's bits come from XLA's ThreeFry bit generator (lax.rng_bit_generator), keyed by four words drawn from
  fold_in(key, row): on XLA:CPU it makes them 3-4x faster than jax.random's threefry, which took about an eighth of
  the demo's G+D step (docs/performance.md). XLA does not promise the same bits on other backends or versions."""

  def row_bits(row):
    state = jax.random.bits(jax.random.fold_in(key, row), (4,), jnp.uint32)
    return jax.lax.rng_bit_generator(state, tuple(shape), jnp.uint32,
                                     algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)[1]
  # Row by row, not vmap: under vmap rng_bit_generator does not draw each row's bits from that row's key.
  bits = jnp.stack([row_bits(rows[i]) for i in range(rows.shape[0])])
  # The top 23 bits as a float32 mantissa: uniform on [0, 1) in steps of 2^-23, as jax.random.uniform makes them.
  uniform = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
  uniform = jnp.maximum(uniform, jnp.finfo(jnp.float32).tiny)
  return (-jnp.log(-jnp.log(uniform))).astype(dtype)


def scaled_gumbel_noise(key, rows, shape, scale: float, dtype=jnp.float32):
  """scale x gumbel_noise(key, rows, shape): 1 makes argmax(logits + noise) a draw from softmax(logits), 0 (no
  noise drawn) makes it argmax(logits), the code map a function of z alone."""
  if scale == 0:
    return jnp.zeros((rows.shape[0], *shape), dtype)
  noise = gumbel_noise(key, rows, shape, dtype)
  return noise if scale == 1 else noise * jnp.asarray(scale, dtype)


def sample_gumbel_scale(config) -> float:
  """The Gumbel noise's scale when drawing samples (config.sample_gumbel_scale; 1 in runs saved before it)."""
  return config.get('sample_gumbel_scale', 1.0)


def make_sampler(generator, stage1_model, head: str, gumbel_scale: float = 1.0):
  """(g_variables, stage1_variables, z [N, latent], rows [N], key) -> (images [N, S, S, 1] in [0, 1], codes [N, s, s]).

  Sample i is a function of (z_i, key, rows_i) only, so batching does not change it. The generator runs with its
  batch-norm running averages (train=False)."""

  def sample(g_variables, stage1_variables, z, rows, key):
    outputs = generator.apply(g_variables, z, train=False)
    gumbel = scaled_gumbel_noise(key, rows, outputs.shape[1:], gumbel_scale, outputs.dtype)
    codes = dcgan.sample_codes(outputs, stage1_variables[vqvae.VQ]['codebook'], head, gumbel, ops.argmax())
    decoded = stage1_model.apply(stage1_variables, codes, method=vqvae.VQVAE.decode_codes)
    return jnp.clip(decoded, 0, 1), codes
  return jax.jit(sample)


def generate_batches(sampler, g_variables, stage1_variables, num: int, latent_dim: int, seed: int,
                     batch: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The `num` samples of a seed, batch by batch (images [<= batch, S, S, 1], codes [<= batch, s, s]): fixed-size
  batches (one compile), memory flat in num."""
  z = np.asarray(jax.random.normal(jax.random.key(seed), (num, latent_dim)))
  noise_key = jax.random.key(seed + 1)
  for begin in range(0, num, batch):
    rows = np.arange(begin, begin + batch)
    chunk = np.zeros((batch, latent_dim), np.float32)
    chunk[:min(batch, num - begin)] = z[begin:begin + batch]
    out, out_codes = jax.device_get(sampler(g_variables, stage1_variables, chunk, rows, noise_key))
    yield out[:num - begin], out_codes[:num - begin]


def generate(sampler, g_variables, stage1_variables, num: int, latent_dim: int, seed: int, batch: int = 16):
  """`num` samples (images [num, S, S, 1], codes [num, s, s]) for a seed, as generate_batches draws them."""
  batches = list(generate_batches(sampler, g_variables, stage1_variables, num, latent_dim, seed, batch))
  return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def sampling_variables(g_state) -> dict:
  """The generator variables samples are drawn from: the EMA weights and the batch-norm running averages."""
  return {'params': g_state.ema_params, 'batch_stats': g_state.batch_stats}


def check_stage1_unchanged(config, stage1_config) -> None:
  """A stage-2 run only fits the stage-1 model it was trained with."""
  for field in STAGE1_FIELDS:
    if 'stage1_model' in config and config.stage1_model[field] != stage1_config[field]:
      raise UserError(f'{config.vqvae_workdir}: stage-1 {field}={stage1_config[field]!r}, but this stage-2 run was '
                      f'trained with {config.stage1_model[field]!r}: train stage 2 again in another --workdir')


class Loaded(NamedTuple):
  """A trained stage 2 with the stage 1 it renders through."""
  sample: Callable          # make_sampler's function
  g_variables: dict         # the generator's (EMA) params and batch-norm averages
  stage1_model: Any
  stage1_variables: dict
  stage1_config: ml_collections.ConfigDict
  config: ml_collections.ConfigDict   # the stage-2 run's


def load(workdir: str, vqvae_workdir: str = '') -> Loaded:
  """A stage-2 run from its best checkpoint (lowest validation SWD), else its latest, and its stage 1: the copy in
  WORKDIR/stage1 of the checkpoint it was trained on, for runs older than that copy the stage-1 workdir they
  recorded, or `vqvae_workdir` where given."""
  if not os.path.isdir(checkpoints.path(workdir)):
    raise UserError(f'{workdir}: stage-2 workdir does not exist (train it with train_gan.py, or pass --workdir)')
  stage, config = checkpoints.read_config(workdir)
  if stage != checkpoints.STAGE2:
    raise UserError(f'{workdir}: holds a {stage} run, expected a stage-2 ({checkpoints.STAGE2}) workdir')
  pinned = checkpoints.path(workdir, stage1.PINNED)
  if vqvae_workdir:
    config.vqvae_workdir = vqvae_workdir
  elif os.path.exists(os.path.join(pinned, checkpoints.CONFIG_FILE)):
    config.vqvae_workdir = pinned     # the copy of the stage 1 it was trained on (stage1.pin)
  elif not os.path.isdir(config.vqvae_workdir):
    raise UserError(f'{config.vqvae_workdir}: the stage-1 workdir this stage-2 run was trained on does not exist '
                    f'(a relative path is read from the current directory): pass --vqvae_workdir=DIR')
  stage1_model, stage1_variables, stage1_config = stage1.load(config.vqvae_workdir)
  check_stage1_unchanged(config, stage1_config)
  state, _ = checkpoints.restore_trained(workdir, 'stage-2')
  generator_state = state['0'] if '0' in state else state[0]
  g_variables = {'params': generator_state['ema_params'], 'batch_stats': generator_state['batch_stats']}
  generator, _ = make_models(config, stage1_config)
  expected = jax.eval_shape(functools.partial(generator.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, config.latent_dim), jnp.float32))
  checkpoints.check_fits(g_variables, expected, workdir,
                         'its generator was trained by another version of oasis_jax; train stage 2 again in another '
                         '--workdir')
  return Loaded(make_sampler(generator, stage1_model, config.head, sample_gumbel_scale(config)), g_variables,
                stage1_model, stage1_variables, stage1_config, config)


GRID_SAMPLES = 64                 # grid.png shows the first 64 samples (8 x 8)
OUR_FILES = re.compile(r'^(sample_\d{4,}|grid)\.png$')


def write_samples(workdir: str, outdir: str, num: int, seed: int, batch: int = 16, say=print,
                  vqvae_workdir: str = '') -> list[str]:
  """Writes sample_0000.png ... and grid.png (the first 64) into outdir as they are drawn (memory flat in num); the
  same seed gives the same images. Sample files an earlier run left in outdir (sample_*.png, grid.png; nothing
  else) are removed first, and `say` reports it, so the folder holds exactly this run's samples."""
  if num <= 0:
    raise UserError(f'--num={num}: expected a positive number of samples')
  loaded = load(workdir, vqvae_workdir)
  try:
    os.makedirs(outdir, exist_ok=True)
    probe = os.path.join(outdir, '.write_test')
    open(probe, 'w').close()
    os.remove(probe)
  except OSError as error:
    raise UserError(f'{outdir}: cannot write samples there ({error.strerror})') from None
  earlier = sorted(name for name in os.listdir(outdir) if OUR_FILES.match(name))
  if earlier:
    for name in earlier:
      os.remove(os.path.join(outdir, name))
    say(f'removed {len(earlier)} earlier sample files from {outdir}')
  files, shown = [], []
  for rendered, _ in generate_batches(loaded.sample, loaded.g_variables, loaded.stage1_variables, num,
                                      loaded.config.latent_dim, seed, batch):
    for image in rendered:
      files.append(os.path.join(outdir, f'sample_{len(files):04d}.png'))
      images.save_png(images.to_uint8(image), files[-1])
    shown.extend(rendered[:GRID_SAMPLES - len(shown)])
  images.save_png(images.grid(np.stack(shown), columns=8), os.path.join(outdir, 'grid.png'))
  return files
