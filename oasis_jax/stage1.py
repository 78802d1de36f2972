"""A trained stage 1 as a function of slices: `load` it from a workdir, `encode_split` a split to code maps,
`reconstruct` images, `decode` code maps, and score its reconstructions (`make_eval_step`, `evaluate_split`).
Stage-1 training, stage-2 training and evaluation all use these; nothing here imports a trainer."""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from oasis_jax import checkpoints, images, metrics, ops, parallel
from oasis_jax.data import input_pipeline
from oasis_jax.errors import UserError
from oasis_jax.models import vqvae

PINNED = 'stage1'   # WORKDIR/stage1 of a stage-2 run: the stage 1 it was trained on (see `pin`)


def model_from_config(config) -> vqvae.VQVAE:
  """The stage-1 model of a config, with the convolution and arg-min forms `ops.layers` picks for this backend."""
  return vqvae.model_from_config(config, **ops.layers(config.get('conv_impl', 'xla')))


def load(workdir: str):
  """(model, variables {'params', 'vq'}, config) of a stage-1 run: its best checkpoint, else its latest."""
  if not os.path.isdir(checkpoints.path(workdir)):
    raise UserError(f'{workdir}: stage-1 workdir does not exist (config.vqvae_workdir)')
  stage, config = checkpoints.read_config(workdir)
  if stage != checkpoints.STAGE1:
    raise UserError(f'{workdir}: holds a {stage} run, expected a stage-1 ({checkpoints.STAGE1}) workdir')
  state, _ = checkpoints.restore_trained(workdir, 'stage-1')
  model = model_from_config(config)
  variables = {'params': state['params'], vqvae.VQ: state[vqvae.VQ]}
  expected = jax.eval_shape(model.init, jax.random.key(0),   # traced, nothing computed
                            jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 1), jnp.float32))
  checkpoints.check_fits(variables, expected, workdir,
                         'it was trained by another version of oasis_jax; train stage 1 again in another --workdir')
  return model, variables, config


def pin(workdir: str, stage1_workdir: str) -> str:
  """WORKDIR/stage1: the stage-1 checkpoint a stage-2 run is trained on (best, else latest, of stage1_workdir), copied
  once, with its config, as a stage-1 workdir of its own. Resuming, sampling and evaluating read the copy, so stage 1
  can be trained further or retrained without changing what stage 2 decodes with. Returns its path."""
  pinned = checkpoints.path(workdir, PINNED)
  if os.path.isdir(pinned) and not checkpoints.has_checkpoint(workdir):
    shutil.rmtree(pinned)   # left by a run that failed before its first checkpoint: copy what this run uses
  if checkpoints.latest_complete_step(checkpoints.path(pinned, 'checkpoints')) is None:
    if os.path.exists(checkpoints.path(pinned, checkpoints.CONFIG_FILE)):   # copied once, since set aside as damaged
      raise UserError(f'{pinned}: the stage-1 checkpoint this stage-2 run was trained on is missing or damaged; '
                      'train stage 2 again in another --workdir')
    stage, config = checkpoints.read_config(stage1_workdir)
    state, step = checkpoints.restore_trained(stage1_workdir, 'stage-1')
    checkpoints.write_config(pinned, config, stage)
    checkpoints.save_raw(checkpoints.path(pinned, 'checkpoints'), step,
                         {'params': state['params'], vqvae.VQ: state[vqvae.VQ]})
  return pinned


def encode_split(model: vqvae.VQVAE, variables, source, image_size: int, batch_size: int = 32) -> np.ndarray:
  """The code maps [N, s, s] int32 of every slice of a split, in order (the encoder + nearest codebook vector)."""
  sharding = input_pipeline.current_sharding(batch_size * jax.local_device_count(), image_size)
  sharding = input_pipeline.Sharding(sharding.global_batch, 1, 0, sharding.local_devices, image_size)
  encode = _encoder(model)
  p_variables = parallel.replicate(variables)
  maps = []
  for batch, mask in input_pipeline.eval_batches(source, sharding):
    codes = np.asarray(encode(p_variables, batch))
    maps.append(codes[mask])
  return np.concatenate(maps)


def reconstruct(model: vqvae.VQVAE, variables, images, batch_size: int = 16) -> np.ndarray:
  """Reconstructions [N, S, S, 1] in [0, 1] of images [N, S, S, 1] (encode, quantise, decode), in batches."""
  return _batched(_reconstructor(model), variables, images, batch_size)


def decode(model: vqvae.VQVAE, variables, codes, batch_size: int = 16) -> np.ndarray:
  """The images [N, S, S, 1] in [0, 1] that code maps [N, s, s] decode to: `reconstruct` of the slices whose codes
  they are (up to float rounding), without encoding them again."""
  return _batched(_decoder(model), variables, codes, batch_size)


def _batched(apply, variables, inputs, batch_size: int) -> np.ndarray:
  """apply(variables, batch) over inputs in batches, the last one padded, so that one compiled program serves all."""
  out = []
  for start in range(0, len(inputs), batch_size):
    batch = inputs[start:start + batch_size]
    real = len(batch)
    batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    out.append(np.asarray(apply(variables, batch))[:real])
  return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _encoder(model: vqvae.VQVAE):
  """The pmapped encoder to codes of a model object, compiled once however often a split is encoded."""
  return jax.pmap(lambda v, x: model.apply(v, x, method=vqvae.VQVAE.encode_to_codes))


@functools.lru_cache(maxsize=8)
def _reconstructor(model: vqvae.VQVAE):
  return jax.jit(lambda v, x: jnp.clip(model.apply(v, x)[0], 0, 1))


@functools.lru_cache(maxsize=8)
def _decoder(model: vqvae.VQVAE):
  return jax.jit(lambda v, codes: jnp.clip(model.apply(v, codes, method=vqvae.VQVAE.decode_codes), 0, 1))


def make_eval_step(model: vqvae.VQVAE, num_embeddings: int):
  """pmapped: sums of per-image SSIM/PSNR over the real (mask) rows and their code counts, summed over all devices
  of all processes (so every process gets the global figures), and this device's reconstructions."""

  def step(variables, batch, mask):
    reconstruction, _, _, codes = model.apply(variables, batch)
    real = mask.astype(jnp.float32)
    weights = real[:, None, None] * jnp.ones(codes.shape, jnp.float32)
    counts = jax.nn.one_hot(codes, num_embeddings).reshape(-1, num_embeddings).T @ weights.reshape(-1)
    sums = {'ssim': jnp.sum(metrics.ssim(reconstruction, batch) * real),
            'psnr': jnp.sum(metrics.psnr(reconstruction, batch) * real), 'images': jnp.sum(real), 'counts': counts}
    return jax.lax.psum(sums, parallel.AXIS), jnp.clip(reconstruction, 0, 1)
  return jax.pmap(step, axis_name=parallel.AXIS)


def evaluate_split(p_eval_step, p_variables, source, sharding, max_images: int = -1):
  """SSIM, PSNR, perplexity and codes used over a split; plus the first batch's images and reconstructions.

  Args: p_eval_step from make_eval_step; p_variables replicated over local devices; a split's data source;
  the input_pipeline.Sharding of its batches; max_images > 0 stops after the batch that reaches it.
  Returns: ({'ssim', 'psnr', 'perplexity', 'codes_used', 'images'}, (originals, reconstructions))."""
  totals, first = None, None
  for batch, mask in input_pipeline.eval_batches(source, sharding):
    sums, reconstruction = jax.device_get(p_eval_step(p_variables, batch, mask))
    sums = jax.tree.map(lambda x: np.asarray(x[0], np.float64), sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if first is None:
      first = (batch[mask], reconstruction[mask])
    if 0 < max_images <= totals['images']:
      break
  counts = totals['counts']
  result = {'ssim': float(totals['ssim'] / totals['images']), 'psnr': float(totals['psnr'] / totals['images']),
            'perplexity': float(vqvae.perplexity(jnp.asarray(counts))), 'codes_used': int((counts > 0).sum()),
            'images': int(totals['images'])}
  return result, first


def comparison_grid(originals, reconstructions, count: int = 8):
  """Rows of originals over their reconstructions."""
  count = min(count, len(originals))
  return images.grid(np.concatenate([originals[:count], reconstructions[:count]]), columns=count)
