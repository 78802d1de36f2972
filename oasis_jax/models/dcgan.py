"""Stage 2 model: a DCGAN (Radford et al. 2015) over stage 1's discrete code maps.

Codes are categorical, not intensities. The generator maps z ~ N(0, I) (dim 100) to per-position logits over the K
codes, [N, s, s, K]. For the discriminator these become codes through a straight-through Gumbel-softmax: the forward
pass uses the one-hot of argmax(logits + Gumbel noise) (a valid code map), the backward pass the gradient of
softmax((logits + g) / tau). The discriminator sees codebook embeddings, one-hot codes @ the frozen stage-1
codebook, [N, s, s, D] (config.discriminator_input='embedding', the default), or the one-hot codes themselves,
[N, s, s, K] ('one_hot'); real code maps of training slices are presented the same way. Sampling draws codes the
way training does, argmax(logits + Gumbel noise), the noise optionally scaled down for a sharper draw
(config.sample_gumbel_scale), so every generated code is an index in [0, K) that stage 1's decoder can render.

Generator: dense to 4x4 x (width * 2^(L-1)), then L = log2(s / 4) x2 upsamplings (vqvae.Upsample: sub-pixel convs,
nearest-neighbour resize + 3x3 conv, or the DCGAN paper's 4x4 stride-2 transposed convs), each followed by batch norm
(statistics averaged over devices under pmap) and ReLU, `final_convs` 3x3 conv + batch norm + ReLU blocks at the code
map's size, and a 3x3 conv to the head. Discriminator: 4x4 stride-2 convs with LeakyReLU(0.2) down to 4x4, an
optional minibatch standard-deviation feature (Karras et al. 2018, against mode collapse), then a dense logit; no
batch norm in the discriminator (it would mix real and generated statistics).

Two heads (config.head), both emitting only valid code maps:
  'logits' (design a): K logits per position, straight-through Gumbel-softmax to one-hot codes (embedded or not).
  'latent' (design b): a D-dim vector per position, replaced by its nearest codebook vector (straight-through, as
            in stage 1's quantiser); the discriminator sees the quantised latents.
"""
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from oasis_jax.models.vqvae import ModuleDef, Upsample, nearest_codes, straight_through


class Generator(nn.Module):
  code_size: int            # s: the code map is s x s
  out_features: int         # K logits (head 'logits') or D latent channels (head 'latent')
  width: int = 64
  upsample: str = 'subpixel'
  axis_name: Any = None     # set to the pmap axis to average batch-norm statistics over devices
  conv: ModuleDef = nn.Conv # the convolution layer (oasis_jax.ops.layers picks a faster one on CPU)
  final_convs: int = 0      # 3x3 conv + batch norm + ReLU blocks at the code map's size, before the head

  @nn.compact
  def __call__(self, z, train: bool = True):
    levels = int(math.log2(self.code_size // 4))
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name if train else None)
    x = nn.Dense(4 * 4 * self.width * 2 ** levels)(z).reshape(z.shape[0], 4, 4, self.width * 2 ** levels)
    x = nn.relu(norm()(x))
    for level in range(levels):
      x = Upsample(self.width * 2 ** (levels - level - 1), self.upsample, conv=self.conv)(x)
      x = nn.relu(norm()(x))
    for _ in range(self.final_convs):
      x = nn.relu(norm()(self.conv(x.shape[-1], (3, 3))(x)))
    return self.conv(self.out_features, (3, 3))(x)


class Discriminator(nn.Module):
  code_size: int
  width: int = 64
  minibatch_std_group: int = 0  # > 0: append the minibatch standard deviation over groups of this many rows
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, inputs):
    x = inputs
    for level in range(int(math.log2(self.code_size // 4))):
      x = nn.leaky_relu(self.conv(self.width * 2 ** level, (4, 4), strides=(2, 2))(x), 0.2)
    if self.minibatch_std_group:
      x = minibatch_std(x, self.minibatch_std_group)
    return nn.Dense(1)(x.reshape(x.shape[0], -1))[:, 0]


def minibatch_std(x, group: int):
  """Appends one channel: the mean over features of the standard deviation across each group of `group`
  consecutive rows (Karras et al. 2018). A generator that emits one mode gets a tell-tale near-zero channel.

  Groups are consecutive rows, so with a per-device batch divisible by `group` 1 device and 2 devices agree."""
  n, h, w, c = x.shape
  group = min(group, n)
  grouped = x.reshape(n // group, group, h, w, c)
  std = jnp.sqrt(jnp.var(grouped, axis=1) + 1e-8).mean(axis=(1, 2, 3))          # [n / group]
  feature = jnp.broadcast_to(jnp.repeat(std, group)[:, None, None, None], (n, h, w, 1))
  return jnp.concatenate([x, feature], axis=-1)


def argmax_last(x):
  """jnp.argmax over the last axis, int32: the first index among equal maxima."""
  return jnp.argmax(x, axis=-1).astype(jnp.int32)


def gumbel_straight_through(logits, gumbel_noise, temperature: float, argmax: Callable = argmax_last):
  """One-hot codes forward, softmax((logits + g) / tau) gradients backward, g the given Gumbel(0, 1) noise;
  `argmax` computes the codes over the last axis (ops.argmax() picks a faster one on CPU).

  Returns (one_hot, codes)."""
  noisy = logits + gumbel_noise
  soft = jax.nn.softmax(noisy / temperature, axis=-1)
  codes = argmax(noisy)
  hard = jax.nn.one_hot(codes, logits.shape[-1], dtype=logits.dtype)
  return hard + soft - jax.lax.stop_gradient(soft), codes


def embed(one_hot, codebook):
  """(Relaxed) one-hot codes [N, s, s, K] -> codebook embeddings [N, s, s, D]."""
  return one_hot @ codebook


def quantize_straight_through(latents, codebook):
  """Design (b): latents [N, s, s, D] -> (nearest codebook vectors forward / identity gradient backward, codes)."""
  codes = nearest_codes(latents.reshape(-1, latents.shape[-1]), codebook).reshape(latents.shape[:-1])
  return straight_through(latents, jnp.take(codebook, codes, axis=0)), codes


def sample_codes(outputs, codebook, head: str, gumbel_noise=None, argmax: Callable = argmax_last):
  """The code map a generator's outputs stand for, always valid indices in [0, K).

  head 'logits': argmax(logits + g): with Gumbel noise g a draw from the categorical distribution the generator was
  trained to emit (the forward pass of training), with scaled-down noise a sharper one; argmax(logits) when no noise
  is given. head 'latent': the nearest codebook vector of each latent."""
  if head == 'logits':
    noisy = outputs if gumbel_noise is None else outputs + gumbel_noise
    return argmax(noisy)
  return quantize_straight_through(outputs, codebook)[1]
