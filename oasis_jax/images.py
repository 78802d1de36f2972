"""Writing images: float arrays in [0, 1] to 8-bit grayscale PNGs and grids."""
import os

import numpy as np
from PIL import Image

from oasis_jax.errors import naming_full_disk


def to_uint8(images) -> np.ndarray:
  return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def grid(images, columns: int = 8, pad: int = 2) -> np.ndarray:
  """[N, H, W(, 1)] in [0, 1] -> one uint8 [rows*(H+pad)-pad, columns*(W+pad)-pad] mosaic."""
  images = to_uint8(images).reshape(len(images), images.shape[1], images.shape[2])
  n, h, w = images.shape
  columns = min(columns, n)
  rows = -(-n // columns)
  out = np.zeros((rows * (h + pad) - pad, columns * (w + pad) - pad), np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = image
  return out


def save_png(array_uint8: np.ndarray, file: str) -> None:
  """Writes atomically (temporary file + rename), so a killed run never leaves a half-written PNG."""
  os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
  tmp = file + '.tmp'
  try:
    with naming_full_disk(file):
      Image.fromarray(np.asarray(array_uint8).squeeze()).save(tmp, format='PNG')
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  os.replace(tmp, file)


def thumbnail(source: str, destination: str, width: int) -> None:
  """A copy of a PNG scaled down to at most `width` pixels wide (for the README's pictures)."""
  image = Image.open(source)
  if image.width > width:
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
  os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
  image.save(destination, format='PNG', optimize=True)
