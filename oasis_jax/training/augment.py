"""Differentiable augmentation of the discriminator's inputs (DiffAugment; Zhao et al. 2020), in code space.

The same random transform family is applied to real and generated code maps (as one-hot codes [N, s, s, K] or
codebook embeddings [N, s, s, D]) every time the discriminator sees them, so it cannot memorise the few real maps
of a small dataset; the transforms are differentiable in their input, so the generator's gradient passes through
them.

  translation  shift each map by up to `translation` x s positions in y and x, filling with zeros
  cutout       zero a random square of half the map's side (centre anywhere in the map)

Each row draws its own transform from fold_in(key, row), with `row` its index in the global batch, so a step
is the same function of the global batch on 1 device or on many.
"""
import jax
import jax.numpy as jnp

POLICIES = ('translation', 'cutout')


def check_policy(policy: str) -> tuple[str, ...]:
  """The transforms of a comma-separated policy ('' for none); ValueError names an unknown one."""
  names = tuple(name for name in policy.split(',') if name)
  unknown = [name for name in names if name not in POLICIES]
  if unknown:
    raise ValueError(f'unknown augmentation {unknown[0]!r}: expected a comma-separated subset of {POLICIES}')
  return names


def translate(x, shift):
  """x [s, s, D] moved by shift (dy, dx) int32 positions, zeros where nothing moves in (x[i - dy, j - dx])."""
  s = x.shape[0]
  padded = jnp.pad(x, ((s, s), (s, s), (0, 0)))
  return jax.lax.dynamic_slice(padded, (s - shift[0], s - shift[1], 0), x.shape)


def cutout(x, centre, size: int):
  """x [s, s, D] with the size x size square whose top-left corner is centre - size // 2 zeroed (clipped at the
  borders)."""
  s = x.shape[0]
  rows, columns = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
  top, left = centre[0] - size // 2, centre[1] - size // 2
  inside = (rows >= top) & (rows < top + size) & (columns >= left) & (columns < left + size)
  return jnp.where(inside[:, :, None], 0.0, x)


def augment(embeddings, key, rows, policy: tuple[str, ...], translation: float = 0.125):
  """embeddings [N, s, s, D], key, rows [N] global row indices -> the augmented embeddings."""
  if not policy:
    return embeddings
  s = embeddings.shape[1]
  limit = int(round(translation * s))

  def one(x, row):
    translate_key, cutout_key = jax.random.split(jax.random.fold_in(key, row))
    if 'translation' in policy and limit > 0:
      x = translate(x, jax.random.randint(translate_key, (2,), -limit, limit + 1))
    if 'cutout' in policy:
      x = cutout(x, jax.random.randint(cutout_key, (2,), 0, s), s // 2)
    return x
  return jax.vmap(one)(embeddings, rows)
