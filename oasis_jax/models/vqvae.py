"""Stage 1 model: a VQ-VAE (van den Oord et al. 2017) whose codebook is learned by EMA updates, not gradients.

Encoder: `num_downsamples` strided 4x4 convs (x2 down each; the last has `num_hiddens` channels, the others half),
a 3x3 conv, a residual stack, and a 1x1 conv to `embedding_dim`: a 256x256 slice becomes a 64x64 grid of vectors
with two downsamples. Each vector is replaced by its nearest codebook vector (squared L2); the decoder
mirrors the encoder, upsampling x2 with a sub-pixel conv (3x3 conv to 4x channels + depth-to-space) or, as in the
original PyTorch project, a stride-2 4x4 transposed conv (`config.upsample`).

Codebook state (flax collection 'vq', not 'params'), as DeepMind Sonnet's `VectorQuantizerEMA`:
  codebook   [K, D]  the code vectors e_k
  ema_counts [K]     EMA of N_k, the number of vectors assigned to code k (stored biased, debiased when used)
  ema_sums   [K, D]  EMA of m_k, the sum of the vectors assigned to code k (likewise)
  ema_steps  []      how many EMA updates have been made (for the zero-debiasing 1 - decay^t)
`ema_update` applies: hidden <- hidden - (hidden - value) * (1 - decay); debiased = hidden / (1 - decay^t);
N <- (N + eps) / (sum N + K eps) * sum N (Laplace smoothing); e = m / N.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VQ = 'vq'  # the variable collection holding the codebook state
ModuleDef = Any


def argmin_last(x):
  """jnp.argmin over the last axis, int32: the first index among equal minima."""
  return jnp.argmin(x, axis=-1).astype(jnp.int32)


class ResidualStack(nn.Module):
  num_hiddens: int
  num_residual_layers: int
  num_residual_hiddens: int
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x):
    for _ in range(self.num_residual_layers):
      h = self.conv(self.num_residual_hiddens, (3, 3), dtype=self.dtype)(nn.relu(x))
      x = x + self.conv(self.num_hiddens, (1, 1), dtype=self.dtype)(nn.relu(h))
    return nn.relu(x)


def depth_to_space(x, block: int = 2):
  """[N, H, W, C * b * b] -> [N, H * b, W * b, C] (the sub-pixel shuffle)."""
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, block, block, c // block ** 2)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * block, w * block, c // block ** 2)


UPSAMPLE_KINDS = ('subpixel', 'transpose', 'resize')


class Upsample(nn.Module):
  """x2 upsampling: 'subpixel' (3x3 conv to 4C + depth-to-space), 'transpose' (4x4 stride-2 transposed conv) or
  'resize' (nearest-neighbour x2, then a 3x3 conv: every output pixel from the same kernel, so no checkerboard
  pattern; Odena et al. 2016)."""
  features: int
  kind: str = 'subpixel'
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x):
    if self.kind == 'subpixel':
      return depth_to_space(self.conv(4 * self.features, (3, 3), dtype=self.dtype)(x))
    if self.kind == 'resize':
      return self.conv(self.features, (3, 3), dtype=self.dtype)(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    if self.kind == 'transpose':
      return nn.ConvTranspose(self.features, (4, 4), strides=(2, 2), dtype=self.dtype)(x)
    raise ValueError(f'unknown upsample kind {self.kind!r}')


class Encoder(nn.Module):
  num_hiddens: int
  num_residual_layers: int
  num_residual_hiddens: int
  embedding_dim: int
  num_downsamples: int = 2
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x):
    def conv(features, size, stride=1):
      return self.conv(features, (size, size), strides=(stride, stride), dtype=self.dtype)
    for i in range(self.num_downsamples):
      width = self.num_hiddens if i == self.num_downsamples - 1 else self.num_hiddens // 2
      x = nn.relu(conv(width, 4, 2)(x))
    x = conv(self.num_hiddens, 3)(x)
    x = ResidualStack(self.num_hiddens, self.num_residual_layers, self.num_residual_hiddens, self.dtype,
                      self.conv)(x)
    return conv(self.embedding_dim, 1)(x)


class Decoder(nn.Module):
  num_hiddens: int
  num_residual_layers: int
  num_residual_hiddens: int
  num_downsamples: int = 2
  upsample: str = 'subpixel'
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.num_hiddens, (3, 3), dtype=self.dtype)(x)
    x = ResidualStack(self.num_hiddens, self.num_residual_layers, self.num_residual_hiddens, self.dtype,
                      self.conv)(x)
    for i in range(self.num_downsamples):
      last = i == self.num_downsamples - 1
      x = Upsample(1 if last else self.num_hiddens // 2, self.upsample, self.dtype, self.conv)(x)
      x = x if last else nn.relu(x)
    return x


def codebook_init(key, num_embeddings: int, embedding_dim: int):
  """Sonnet's default: variance-scaling uniform (fan-in = D)."""
  limit = np.sqrt(3.0 / embedding_dim)
  return jax.random.uniform(key, (num_embeddings, embedding_dim), jnp.float32, -limit, limit)


def squared_distances(vectors, codebook):
  """||v - e_k||^2 [N, K] of every row of vectors [N, D] to every codebook vector [K, D], as one GEMM."""
  return (jnp.sum(vectors ** 2, axis=1, keepdims=True) - 2 * vectors @ codebook.T
          + jnp.sum(codebook ** 2, axis=1)[None, :])


def nearest_codes(vectors, codebook, argmin: Callable = argmin_last):
  """Index (int32) of the nearest codebook vector (squared L2) for each row of vectors [N, D]; fp32; the first
  among equally near ones. `argmin` computes it over the last axis of the distances [N, K]."""
  return argmin(squared_distances(vectors, codebook))


def straight_through(z, quantized):
  """Forward: the quantized vectors; backward: the identity to z (gradients skip the argmin)."""
  return z + jax.lax.stop_gradient(quantized - z)


class VQVAE(nn.Module):
  """Images in [0, 1] [N, S, S, 1] -> (reconstruction, z_e, quantized, codes)."""
  num_hiddens: int = 128
  num_residual_layers: int = 2
  num_residual_hiddens: int = 32
  embedding_dim: int = 64
  num_embeddings: int = 512
  num_downsamples: int = 2
  upsample: str = 'subpixel'
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv           # the convolution layer (oasis_jax.ops.layers picks a faster one on CPU)
  argmin: Callable = argmin_last      # arg-min over the last axis, for the nearest codes

  def setup(self):
    self.encoder = Encoder(self.num_hiddens, self.num_residual_layers, self.num_residual_hiddens,
                           self.embedding_dim, self.num_downsamples, self.dtype, self.conv)
    self.decoder = Decoder(self.num_hiddens, self.num_residual_layers, self.num_residual_hiddens,
                           self.num_downsamples, self.upsample, self.dtype, self.conv)
    k, d = self.num_embeddings, self.embedding_dim
    self.codebook = self.variable(VQ, 'codebook', lambda: codebook_init(self.make_rng('params'), k, d))
    self.ema_counts = self.variable(VQ, 'ema_counts', lambda: jnp.zeros((k,), jnp.float32))
    self.ema_sums = self.variable(VQ, 'ema_sums', lambda: jnp.zeros((k, d), jnp.float32))
    self.ema_steps = self.variable(VQ, 'ema_steps', lambda: jnp.zeros((), jnp.int32))

  def encode(self, images):
    """z_e: [N, s, s, D] float32."""
    return self.encoder((images - 0.5).astype(self.dtype)).astype(jnp.float32)

  def encode_to_codes(self, images):
    """The code map [N, s, s] int32 of each image."""
    z = self.encode(images)
    return nearest_codes(z.reshape(-1, z.shape[-1]), self.codebook.value, self.argmin).reshape(z.shape[:-1])

  def lookup(self, codes):
    """Codebook vectors of a code map [N, s, s] -> [N, s, s, D]."""
    return jnp.take(self.codebook.value, codes, axis=0)

  def decode(self, latents):
    """Latents [N, s, s, D] -> images [N, S, S, 1] (roughly in [0, 1]; not clipped)."""
    return self.decoder(latents.astype(self.dtype)).astype(jnp.float32) + 0.5

  def decode_codes(self, codes):
    return self.decode(self.lookup(codes))

  def __call__(self, images):
    z = self.encode(images)
    codes = nearest_codes(z.reshape(-1, z.shape[-1]), self.codebook.value, self.argmin).reshape(z.shape[:-1])
    quantized = self.lookup(codes)
    return self.decode(straight_through(z, quantized)), z, quantized, codes


def model_from_config(config, conv: ModuleDef = nn.Conv, argmin: Callable = argmin_last) -> VQVAE:
  """The stage-1 model a config describes, with the given convolution layer and arg-min."""
  return VQVAE(num_hiddens=config.num_hiddens, num_residual_layers=config.num_residual_layers,
               num_residual_hiddens=config.num_residual_hiddens, embedding_dim=config.embedding_dim,
               num_embeddings=config.num_embeddings, num_downsamples=config.num_downsamples,
               upsample=config.upsample, dtype=jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32,
               conv=conv, argmin=argmin)


def code_statistics(codes, vectors, num_embeddings: int):
  """Per-code counts N_k [K] and sums m_k [K, D] of the vectors [N, D] assigned by codes [N]."""
  # A scatter-add: ~100x faster on XLA:CPU than the one-hot matrix product (which materialises [N, K]).
  counts = jax.ops.segment_sum(jnp.ones(codes.shape, jnp.float32), codes, num_embeddings)
  return counts, jax.ops.segment_sum(vectors, codes, num_embeddings)


def ema_update(vq_state, counts, sums, decay: float, epsilon: float):
  """One EMA step of the codebook from this step's (global) counts [K] and sums [K, D]; returns the new state."""
  steps = vq_state['ema_steps'] + 1
  hidden_counts = vq_state['ema_counts'] - (vq_state['ema_counts'] - counts) * (1 - decay)
  hidden_sums = vq_state['ema_sums'] - (vq_state['ema_sums'] - sums) * (1 - decay)
  correction = 1.0 - jnp.asarray(decay, jnp.float32) ** steps
  average_counts, average_sums = hidden_counts / correction, hidden_sums / correction
  total = average_counts.sum()
  smoothed = (average_counts + epsilon) / (total + counts.shape[0] * epsilon) * total
  return {'codebook': average_sums / smoothed[:, None], 'ema_counts': hidden_counts, 'ema_sums': hidden_sums,
          'ema_steps': steps}


def usage_counts(vq_state, decay: float):
  """The debiased EMA counts N_k: how many vectors per batch each code has recently been given."""
  return vq_state['ema_counts'] / (1.0 - jnp.asarray(decay, jnp.float32) ** jnp.maximum(vq_state['ema_steps'], 1))


def restart_dead_codes(vq_state, candidates, decay: float, dead_fraction: float):
  """Codes whose debiased count is below `dead_fraction` x the uniform share are re-initialised.

  Dead code k takes candidates[k] (an encoder output of the current batch, the same on every replica) and is given the
  uniform share of counts, so it is not restarted again at once. Returns (new state, number restarted).
  """
  counts = usage_counts(vq_state, decay)
  uniform_share = counts.sum() / counts.shape[0]
  dead = counts < dead_fraction * uniform_share
  correction = 1.0 - jnp.asarray(decay, jnp.float32) ** jnp.maximum(vq_state['ema_steps'], 1)
  new = dict(vq_state)
  new['codebook'] = jnp.where(dead[:, None], candidates, vq_state['codebook'])
  new['ema_counts'] = jnp.where(dead, uniform_share * correction, vq_state['ema_counts'])
  new['ema_sums'] = jnp.where(dead[:, None], candidates * uniform_share * correction, vq_state['ema_sums'])
  return new, dead.sum()


def perplexity(counts):
  """exp(entropy) of the code usage distribution given by counts [K]."""
  probs = counts / jnp.maximum(counts.sum(), 1e-10)
  return jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
