"""Image and codebook metrics. SSIM/PSNR on images in [0, 1] (dm-pix; SSIM with the standard 11x11 Gaussian
window, sigma 1.5)."""
import dm_pix
import jax.numpy as jnp

from oasis_jax.vqvae import perplexity  # noqa: F401  (re-exported: metrics live here for users)


def ssim(images, references):
  """Per-image SSIM of [N, H, W, 1] images in [0, 1]."""
  return dm_pix.ssim(jnp.clip(images, 0, 1), references, max_val=1.0, filter_size=11, filter_sigma=1.5)


def psnr(images, references):
  """Per-image PSNR in dB of [N, H, W, 1] images in [0, 1]."""
  return dm_pix.psnr(jnp.clip(images, 0, 1), references)
