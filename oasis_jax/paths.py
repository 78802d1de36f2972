"""Where oasis_jax keeps what it can rebuild: prepared datasets, JAX's compilation cache, the native kernels."""
import os


def default_cache_dir() -> str:
  """$OASIS_JAX_CACHE, else ~/.cache/oasis_jax (a config's cache_dir field, where it has one, comes first)."""
  return os.environ.get('OASIS_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'oasis_jax')
