"""Generation metrics against independent NumPy references and hand-computed values."""
import numpy as np
import pytest
from scipy import signal

from oasis_jax import metrics


def _ms_ssim_reference(x, y, weights):
  """Float64 NumPy MS-SSIM of two [H, W] images, straight from Wang et al. 2003 (valid 11x11 Gaussian window)."""
  t = np.arange(11) - 5.0
  g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
  window = np.outer(g, g) / np.outer(g, g).sum()
  blur = lambda a: signal.convolve2d(a, window, mode='valid')
  result = 1.0
  for scale, weight in enumerate(weights):
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    cs = (2 * cxy + 0.03 ** 2) / (vx + vy + 0.03 ** 2)
    lum = (2 * mx * my + 0.01 ** 2) / (mx ** 2 + my ** 2 + 0.01 ** 2)
    value = np.mean(lum * cs) if scale == len(weights) - 1 else np.mean(cs)
    result *= max(value, 0.0) ** weight
    x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))
    y = y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2).mean(axis=(1, 3))
  return result


@pytest.mark.parametrize('size, scales', [(64, 3), (256, 5)])
def test_ms_ssim_matches_a_float64_reference(size, scales):
  rng = np.random.default_rng(0)
  base = rng.random((size, size))
  x = np.stack([base, rng.random((size, size))])
  y = np.stack([np.clip(base + 0.1 * rng.standard_normal((size, size)), 0, 1), x[1]])
  weights = np.asarray(metrics.MS_SSIM_WEIGHTS[:scales]) / np.sum(metrics.MS_SSIM_WEIGHTS[:scales])
  got = np.asarray(metrics.ms_ssim(x[..., None].astype(np.float32), y[..., None].astype(np.float32)))
  expected = [_ms_ssim_reference(x[i], y[i], weights) for i in range(2)]
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-5)
  assert got[1] == pytest.approx(1.0, abs=1e-5) and got[0] < 0.99


def test_ms_ssim_diversity_is_lower_for_more_diverse_sets():
  rng = np.random.default_rng(1)
  base = rng.random((64, 64, 1)).astype(np.float32)
  similar = np.stack([np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1) for _ in range(6)])
  different = rng.random((6, 64, 64, 1)).astype(np.float32)
  assert metrics.ms_ssim_diversity(different) < metrics.ms_ssim_diversity(similar)


def test_laplacian_pyramid_collapses_back_to_the_image():
  images = np.random.default_rng(2).random((2, 64, 64)).astype(np.float32)
  levels = metrics.laplacian_pyramid(images)
  assert [level.shape[1] for level in levels] == [64, 32, 16]
  taps = np.asarray(metrics._BINOMIAL)
  current = np.asarray(levels[-1])
  for level in reversed(levels[:-1]):
    up = np.zeros_like(np.asarray(level))
    up[:, ::2, ::2] = current * 4
    padded = np.pad(up, ((0, 0), (2, 2), (2, 2)), mode='reflect')
    blurred = np.asarray(metrics._separable_filter(padded, taps))
    current = np.asarray(level) + blurred
  np.testing.assert_allclose(current, images, atol=1e-5)


def test_sliced_wasserstein_of_a_shift_is_the_mean_projected_shift():
  rng = np.random.default_rng(3)
  a = rng.standard_normal((500, 4)).astype(np.float32)
  shift = np.array([0.5, 0, 0, 0], np.float32)
  assert metrics.sliced_wasserstein(a, a, np.random.default_rng(0)) == 0.0
  directions = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
  directions /= np.linalg.norm(directions, axis=0, keepdims=True)
  expected = np.mean(np.abs(shift @ directions))   # sorting keeps the pairing of a shifted set
  got = metrics.sliced_wasserstein(a, a + shift, np.random.default_rng(0))
  assert got == pytest.approx(expected, rel=1e-4)


def test_swd_ranks_similar_sets_closer_than_noise():
  rng = np.random.default_rng(4)
  yy, xx = np.mgrid[:64, :64]
  blobs = lambda n: np.stack([np.exp(-((yy - rng.integers(20, 44)) ** 2 + (xx - rng.integers(20, 44)) ** 2) / 200.0)
                              for _ in range(n)]).astype(np.float32)
  a, b = blobs(16), blobs(16)
  noise = rng.random((16, 64, 64)).astype(np.float32)
  close, far = metrics.swd(a, b, descriptors=2048), metrics.swd(a, noise, descriptors=2048)
  assert len(close['levels']) == 3 and close['mean'] < far['mean'] / 3


def test_nearest_neighbour_ssim_finds_the_copy_and_equals_the_best_pairwise_ssim():
  rng = np.random.default_rng(5)
  references = rng.random((10, 128, 128, 1)).astype(np.float32)
  references[3] = np.clip(references[2] + 0.1 * rng.standard_normal((128, 128, 1)), 0, 1)   # near, not equal
  queries = np.stack([references[7], rng.random((128, 128, 1)).astype(np.float32) * 1.2 - 0.1, references[2]])
  best = metrics.nearest_neighbour_ssim(queries, references, chunk=4)   # 3 chunks, the last one padded
  assert best[0] == pytest.approx(1.0, abs=1e-5) and best[1] < 0.2
  # Against dm-pix's SSIM of every pair, at the 64x64 the search works at (queries clipped to [0, 1] as `ssim` does).
  small = lambda a: metrics.block_mean(a, 64)
  pairwise = np.array([[float(metrics.ssim(small(q[None]), small(r[None]))[0]) for r in references] for q in queries])
  np.testing.assert_allclose(best, pairwise.max(axis=1), rtol=0, atol=1e-5)


def test_code_histogram_kl_matches_hand_computation():
  real, fake = np.array([3.0, 1.0, 0.0]), np.array([1.0, 1.0, 2.0])
  p, q = real / 4 + 1e-6, fake / 4 + 1e-6
  p, q = p / p.sum(), q / q.sum()
  assert float(metrics.code_histogram_kl(real, fake)) == pytest.approx(np.sum(p * np.log(p / q)), rel=1e-5)
  assert float(metrics.code_histogram_kl(real, real)) == pytest.approx(0.0, abs=1e-6)


def test_code_repeats_counts_equal_neighbours_inside_the_brain_by_hand():
  # One 3x3 code map over a 6x6 image (2x2 pixels per code). Inside (block mean > 0.1): all but the top-right
  # position, whose block averages 0.05.
  codes = np.array([[[1, 1, 2],
                     [1, 3, 3],
                     [4, 3, 3]]])
  images = np.full((1, 6, 6, 1), 0.5, np.float32)
  images[0, :2, 4:, 0] = [[0.2, 0.0], [0.0, 0.0]]
  # Up-down pairs with both inside: column 0 (1,1) (1,4), column 1 (1,3) (3,3), column 2 (3,3) (its first pair has
  # the outside corner); left-right: row 0 (1,1) (its second pair has the corner), row 1 (1,3) (3,3), row 2 (4,3)
  # (3,3). Equal: 3 of 5 up-down, 3 of 5 left-right.
  assert metrics.code_repeats(codes, images) == pytest.approx(6 / 10)
  images[0, :2, 4:] = 0.5   # the corner inside too: + up-down (2,3) and left-right (1,2), neither equal
  assert metrics.code_repeats(codes, images) == pytest.approx(6 / 12)
  assert metrics.code_repeats(codes, np.zeros_like(images)) == 0.0   # nothing inside
