"""Image and codebook metrics. SSIM/PSNR on images in [0, 1] (dm-pix; SSIM with the standard 11x11 Gaussian
window, sigma 1.5)."""
import functools

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from oasis_jax.data.input_pipeline import block_mean
from oasis_jax.models.vqvae import perplexity  # noqa: F401  (re-exported: metrics live here for users)


def ssim(images, references):
  """Per-image SSIM of [N, H, W, 1] images in [0, 1]."""
  return dm_pix.ssim(jnp.clip(images, 0, 1), references, max_val=1.0, filter_size=11, filter_sigma=1.5)


def ssim_differentiable(images, references):
  """Per-image SSIM of [N, H, W(, 1)] images, as `ssim`, for a training loss (config.ssim_weight): the Gaussian
  window as matrix products, as in MS-SSIM. No clipping: the caller clips."""
  images = jnp.reshape(images, images.shape[:3])
  references = jnp.reshape(references, references.shape[:3]).astype(images.dtype)
  return _ssim_terms(images, references)[0]


def psnr(images, references):
  """Per-image PSNR in dB of [N, H, W, 1] images in [0, 1]."""
  return dm_pix.psnr(jnp.clip(images, 0, 1), references)


# --- Generation metrics (stage 2). No downloaded weights: everything is computed from pixels and codes. ---

def code_histogram_kl(real_counts, fake_counts, epsilon: float = 1e-6):
  """KL(real || generated) between two code-usage histograms [K] (each normalised, smoothed by epsilon)."""
  p = real_counts / real_counts.sum() + epsilon
  q = fake_counts / fake_counts.sum() + epsilon
  p, q = p / p.sum(), q / q.sum()
  return jnp.sum(p * jnp.log(p / q))


def code_repeats(codes, images, threshold: float = 0.1) -> float:
  """Of the pairs of neighbouring positions (left-right and up-down) inside the brain, the fraction that hold the
  same code. codes [N, s, s] and the images they decode to [N, S, S, 1] in [0, 1]; a position is inside when its
  (S / s)-pixel square of the image averages above `threshold`. Real code maps change code from one position to the
  next far more often than a smooth generator's, whose repeats render as dotted dashes. 0 when no pair is inside."""
  codes = np.asarray(codes)
  inside = block_mean(np.asarray(images, np.float32), codes.shape[1])[..., 0] > threshold
  pairs = [(codes[:, 1:] == codes[:, :-1], inside[:, 1:] & inside[:, :-1]),             # up-down
           (codes[:, :, 1:] == codes[:, :, :-1], inside[:, :, 1:] & inside[:, :, :-1])]  # left-right
  counted = sum(int(both.sum()) for _, both in pairs)
  return sum(int((same & both).sum()) for same, both in pairs) / counted if counted else 0.0


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  w = np.exp(-x ** 2 / (2 * sigma ** 2))
  return (w / w.sum()).astype(np.float32)


def _separable_filter(images, taps: np.ndarray):
  """Filters [..., H, W] with the separable kernel taps x taps (VALID), as a matrix product along each axis: XLA:CPU
  runs those as GEMMs, where single-channel convolutions run far below the machine's rate."""
  h, w = images.shape[-2:]
  rows, cols = _valid_filter_matrix(h, taps), _valid_filter_matrix(w, taps)
  return jnp.einsum('ih,...hw,jw->...ij', rows, images, cols, precision=jax.lax.Precision.HIGHEST)


def _ssim_terms(x, y):
  """Per-image mean of the SSIM luminance*contrast*structure map and of its contrast*structure part."""
  window = _gaussian_window()
  blur = lambda a: _separable_filter(a, window)
  mu_x, mu_y = blur(x), blur(y)
  var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  cs = (2 * cov + c2) / (var_x + var_y + c2)
  luminance = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
  return jnp.mean(luminance * cs, axis=(1, 2)), jnp.mean(cs, axis=(1, 2))


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


@jax.jit
def ms_ssim(x, y):
  """Multi-scale SSIM (Wang et al. 2003; 11x11 Gaussian window) of [N, H, W(, 1)] images in [0, 1].

  5 scales for images of 176 px and up (256x256 slices); smaller images use the scales that still hold the
  window (64x64: 3), with the weights renormalised."""
  x, y = jnp.asarray(x, jnp.float32).reshape(x.shape[:3]), jnp.asarray(y, jnp.float32).reshape(y.shape[:3])
  scales = max(1, min(len(MS_SSIM_WEIGHTS), int(np.log2(min(x.shape[1:]) / 11)) + 1))
  weights = np.asarray(MS_SSIM_WEIGHTS[:scales]) / np.sum(MS_SSIM_WEIGHTS[:scales])
  result = 1.0
  for scale, weight in enumerate(weights):
    ssim_value, cs = _ssim_terms(x, y)
    value = ssim_value if scale == scales - 1 else cs
    result = result * jnp.maximum(value, 0.0) ** weight
    n, h, w = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    y = y.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
  return result


def ms_ssim_diversity(images, max_pairs: int = 2048, seed: int = 0, chunk: int = 64) -> float:
  """Mean MS-SSIM over distinct pairs of a set of images: lower = more diverse (as in Odena et al. 2017)."""
  n = len(images)
  i, j = np.triu_indices(n, 1)
  if len(i) > max_pairs:
    picked = np.random.default_rng(seed).choice(len(i), max_pairs, replace=False)
    i, j = i[picked], j[picked]
  values = [np.asarray(ms_ssim(images[i[s:s + chunk]], images[j[s:s + chunk]])) for s in range(0, len(i), chunk)]
  return float(np.mean(np.concatenate(values)))


def nearest_neighbour_ssim(queries, references, size: int = 64, chunk: int = 256) -> np.ndarray:
  """For each query image, the highest SSIM against any reference image, both block-averaged to size x size.

  A memorisation check: samples copied from the training set score near 1. Computed at 64x64 so that the full
  OASIS training split (~10k slices) is searched in seconds."""
  shrink = lambda a: block_mean(np.asarray(a, np.float32), min(size, a.shape[1]))
  queries, references = shrink(queries), shrink(references)
  chunk = min(chunk, len(references))
  best = np.full(len(queries), -1.0, np.float32)
  for s in range(0, len(references), chunk):
    part = references[s:s + chunk]   # the last chunk padded with copies of a reference: the same maxima, one program
    part = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
    best = np.maximum(best, np.asarray(_best_ssim(queries, part)))
  return best


@jax.jit
def _best_ssim(queries, references):
  """[Q] max over references [R, h, w, 1] of SSIM(clip(query), reference), as `ssim` computes it, with its 11x11
  Gaussian (VALID) filtering written as two matrix products per image so that the Q x R pairs cost GEMMs."""
  window = _gaussian_window()
  blur = lambda a: _separable_filter(a, window)
  x, y = jnp.clip(queries[..., 0], 0, 1), references[..., 0]
  mu_x, mu_y = blur(x)[:, None], blur(y)[None]
  epsilon = jnp.finfo(jnp.float32).eps ** 2
  var_x = jnp.maximum(epsilon, blur(x * x)[:, None] - mu_x ** 2)
  var_y = jnp.maximum(epsilon, blur(y * y)[None] - mu_y ** 2)
  cov = blur(x[:, None] * y[None]) - mu_x * mu_y
  cov = jnp.sign(cov) * jnp.minimum(jnp.sqrt(var_x * var_y), jnp.abs(cov))
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return jnp.mean(ssim_map, axis=(2, 3)).max(axis=1)


def _valid_filter_matrix(size: int, taps: np.ndarray) -> np.ndarray:
  """[size - len(taps) + 1, size]: a 1-D VALID correlation with taps, as a matrix."""
  out = np.zeros((size - len(taps) + 1, size), np.float32)
  for i in range(len(out)):
    out[i, i:i + len(taps)] = taps
  return out


_BINOMIAL = np.array([1, 4, 6, 4, 1], np.float32) / 16


def laplacian_pyramid(images, min_size: int = 16) -> list:
  """[N, H, W] -> Laplacian levels, finest first (Karras et al. 2018: 5x5 binomial filter, down to 16x16)."""
  return list(_laplacian_pyramid(jnp.asarray(images, jnp.float32), min_size))


def _binomial_blur(images):
  """The 5x5 binomial filter of [N, H, W] with reflected borders, as five shifted adds per axis (a separable 5-tap
  filter: far less work than the dense matrix product _separable_filter spends on wide images)."""
  h, w = images.shape[1:]
  padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2)), mode='reflect')
  rows = sum(float(tap) * padded[:, k:k + h, :] for k, tap in enumerate(_BINOMIAL))
  return sum(float(tap) * rows[:, :, k:k + w] for k, tap in enumerate(_BINOMIAL))


@functools.partial(jax.jit, static_argnames=('min_size',))
def _laplacian_pyramid(images, min_size: int):
  levels, current = [], images
  while current.shape[1] > min_size:
    smaller = _binomial_blur(current)[:, ::2, ::2]
    up = jax.lax.pad(smaller * 4, 0.0, ((0, 0, 0), (0, 1, 1), (0, 1, 1)))   # zeros between and after: [N, H, W]
    levels.append(current - _binomial_blur(up))
    current = smaller
  levels.append(current)
  return tuple(levels)


def _patch_descriptors(level, rng, count: int, patch: int = 7) -> np.ndarray:
  """`count` random patch x patch patches of a pyramid level, [count, patch*patch], normalised per set."""
  level = np.asarray(level)
  n, h, w = level.shape
  img, y, x = rng.integers(0, n, count), rng.integers(0, h - patch + 1, count), rng.integers(0, w - patch + 1, count)
  offsets = np.arange(patch)
  patches = level[img[:, None, None], y[:, None, None] + offsets[None, :, None], x[:, None, None] + offsets[None, None, :]]
  patches = patches.reshape(count, -1)
  return (patches - patches.mean()) / (patches.std() + 1e-8)


def sliced_wasserstein(a, b, rng, directions: int = 512) -> float:
  """Sliced Wasserstein distance between two equally sized sets of descriptors, over random unit directions."""
  projections = rng.standard_normal((a.shape[1], directions)).astype(np.float32)
  projections /= np.linalg.norm(projections, axis=0, keepdims=True)
  # [directions, descriptors], each row contiguous: sorting rows is ~3x faster than sorting strided columns.
  pa, pb = np.sort(projections.T @ a.T, axis=1), np.sort(projections.T @ b.T, axis=1)
  return float(np.mean(np.abs(pa - pb)))


def swd(images_a, images_b, descriptors: int = 8192, seed: int = 0) -> dict:
  """Sliced Wasserstein distance on Laplacian-pyramid 7x7 patches (Karras et al. 2018), x1e3 as they report it.

  Returns {'levels': [per level, finest first], 'mean': average over levels}. The same number of patches is drawn
  from each set, so sets of different sizes compare; lower is closer."""
  rng = np.random.default_rng(seed)
  reshape = lambda a: np.asarray(a, np.float32).reshape(len(a), a.shape[1], a.shape[2])
  pyramid_a, pyramid_b = laplacian_pyramid(reshape(images_a)), laplacian_pyramid(reshape(images_b))
  levels = []
  for level_a, level_b in zip(pyramid_a, pyramid_b):
    da, db = _patch_descriptors(level_a, rng, descriptors), _patch_descriptors(level_b, rng, descriptors)
    levels.append(1e3 * sliced_wasserstein(da, db, rng))
  return {'levels': levels, 'mean': float(np.mean(levels))}
