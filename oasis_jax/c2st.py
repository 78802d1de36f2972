"""A classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017): how well can a classifier tell two sets of slices
apart? Its held-out accuracy is the realism measure a user reads: 0.5 means the two sets are indistinguishable to
it, 1.0 that every slice gives itself away. No downloaded weights.

The classifier is a logistic regression, trained on the fly, on fixed features of each slice that see both the
anatomy's layout and its sharpness (`features`):
  layout     the slice block-averaged to 16x16 (where tissue, ventricles and background are);
  detail     for each of the four finest Laplacian-pyramid bands (Burt & Adelson 1983): a 12-bin histogram of its
             values (how sharp edges are) and its mean energy on an 8x8 grid (where the detail is);
  intensity  a 16-bin histogram of the brain's grey levels (grey/white-matter contrast).
Features are standardised on each training fold; accuracy is over k folds, each image held out once. Images
that belong together (augmented copies of a slice, a slice and its reconstruction) share a fold (`groups_*`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from oasis_jax.metrics import laplacian_pyramid

LAYOUT_SIZE = 16
DETAIL_GRID = 8
DETAIL_BANDS = 4
DETAIL_BINS = np.linspace(-0.3, 0.3, 13)          # 12 bins; values beyond fall into the outer bins
INTENSITY_BINS = np.linspace(0.05, 1.0, 17)       # 16 bins over the brain's grey levels (background < 0.05)


def _histogram(values, edges, mask=None):
  """Per-row histogram of values [N, M] over fixed bin edges (clipped into the outer bins), counting only where mask
  [N, M] is true (default: everywhere), normalised by the count. Bin i holds edges[i] < v <= edges[i + 1] (the
  outer bins everything beyond); counted as differences of 'above each inner edge' sums, which XLA:CPU runs as
  vectorised reductions (a scatter-add histogram runs an order of magnitude slower)."""
  weights = jnp.ones(values.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  total = weights.sum(axis=1)
  above = [total] + [jnp.sum(weights * (values > edge), axis=1) for edge in np.asarray(edges[1:-1], np.float32)]
  above = jnp.stack(above + [jnp.zeros_like(total)], axis=1)                  # [N, bins + 1], non-increasing
  return (above[:, :-1] - above[:, 1:]) / jnp.maximum(total, 1)[:, None]


def _block_mean(images, size: int):
  n, h, w = images.shape
  return images.reshape(n, size, h // size, size, w // size).mean(axis=(2, 4))


@jax.jit
def _features(images):
  """[N, S, S] in [0, 1] (S a power of two >= 32) -> [N, F] float32."""
  n = images.shape[0]
  parts = [_block_mean(images, LAYOUT_SIZE).reshape(n, -1)]
  for band in laplacian_pyramid(images)[:DETAIL_BANDS]:
    parts.append(_histogram(band.reshape(n, -1), DETAIL_BINS))
    parts.append(_block_mean(band ** 2, DETAIL_GRID).reshape(n, -1) * 100.0)
  pixels = images.reshape(n, -1)
  parts.append(_histogram(pixels, INTENSITY_BINS, mask=pixels > INTENSITY_BINS[0]))
  return jnp.concatenate(parts, axis=1).astype(jnp.float32)


def features(images, chunk: int = 64) -> np.ndarray:
  """The C2ST features [N, F] of images [N, S, S(, 1)] in [0, 1], S a power of two >= 32 (256 for OASIS)."""
  images = np.asarray(images, np.float32).reshape(len(images), images.shape[1], images.shape[2])
  out = []
  for begin in range(0, len(images), chunk):   # fixed-size chunks, the last one padded: one compiled program
    part = images[begin:begin + chunk]
    if len(part) < chunk:
      part = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], np.float32)])
    out.append(np.asarray(_features(part))[:len(images) - begin])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=('steps',))
def _fit_predict(x, y, train, l2: float, steps: int = 300):
  """Logistic regression (L2-penalised, full-batch Adam) on the rows of x [N, F] where train [N] is true, with
  features standardised on those rows; the probabilities of every row. Folds select rows by mask, not by slicing,
  so that one compiled program serves them all."""
  weight = train.astype(jnp.float32)
  count = weight.sum()
  mean = (x * weight[:, None]).sum(axis=0) / count
  std = jnp.sqrt((((x - mean) ** 2) * weight[:, None]).sum(axis=0) / count) + 1e-6
  x = (x - mean) / std
  params = {'w': jnp.zeros(x.shape[1]), 'b': jnp.zeros(())}
  tx = optax.adam(0.05)

  def loss(p):
    logits = x @ p['w'] + p['b']
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, y) * weight) / count + l2 * jnp.sum(p['w'] ** 2)

  def step(carry, _):
    p, state = carry
    updates, state = tx.update(jax.grad(loss)(p), state)
    return (optax.apply_updates(p, updates), state), None
  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return jax.nn.sigmoid(x @ params['w'] + params['b'])


def accuracy(features_a, features_b, folds: int = 5, seed: int = 0, l2: float = 1e-2, groups_a=None,
             groups_b=None) -> dict:
  """Held-out accuracy of telling feature rows of set a [Na, F] from set b [Nb, F] (k-fold cross-validation).

  groups_a [Na], groups_b [Nb]: rows with the same label, in either set, go into the same fold: near-copies of one
  slice (augmented copies, a subject's neighbouring slices), or a slice and its reconstruction. Otherwise a
  classifier can recognise a held-out image by its copy in the training folds. Default: each row its own group.
  Returns {'accuracy': fraction of held-out images classified right, 'std_error': its binomial standard error,
  'images': Na + Nb}."""
  features_a, features_b = np.asarray(features_a, np.float32), np.asarray(features_b, np.float32)
  groups_a = np.arange(len(features_a)) if groups_a is None else np.asarray(groups_a)
  groups_b = len(features_a) + np.arange(len(features_b)) if groups_b is None else np.asarray(groups_b)
  groups = np.concatenate([groups_a, groups_b])
  labels = np.unique(groups)
  fold_of_label = np.empty(len(labels), np.int64)
  fold_of_label[np.random.default_rng(seed).permutation(len(labels))] = np.arange(len(labels)) % folds
  fold = fold_of_label[np.searchsorted(labels, groups)]
  x = np.concatenate([features_a, features_b])
  y = np.concatenate([np.zeros(len(features_a)), np.ones(len(features_b))]).astype(np.float32)
  correct = 0
  for k in range(folds):
    test = fold == k
    probabilities = np.asarray(_fit_predict(x, y, ~test, l2))[test]
    correct += int(np.sum((probabilities > 0.5) == (y[test] > 0.5)))
  value = correct / len(y)
  return {'accuracy': value, 'std_error': float(np.sqrt(value * (1 - value) / len(y))), 'images': int(len(y))}


def real_vs_real(features_real, groups=None, seed: int = 0, **kwargs) -> dict:
  """The baseline: two disjoint random halves of one set, which a sound test finds indistinguishable (accuracy
  near 0.5). groups [N]: near-copies share a label; a group stays in one half and one fold."""
  rng = np.random.default_rng(seed + 1)
  groups = np.arange(len(features_real)) if groups is None else np.asarray(groups)
  labels = np.unique(groups)
  first_half = np.isin(groups, rng.permutation(labels)[:len(labels) // 2])
  return accuracy(features_real[first_half], features_real[~first_half], seed=seed, groups_a=groups[first_half],
                  groups_b=groups[~first_half], **kwargs)
