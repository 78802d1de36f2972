"""Device plumbing, in one place: the pmap axis name, CPU devices, replicate/unreplicate, process-0-only writes."""
import jax
import jax.numpy as jnp
import numpy as np

from oasis_jax.errors import UserError

AXIS = 'batch'  # the pmap axis over local devices (and, with jax.distributed, over processes)


def use_cpu_devices(count: int, batch_size: int) -> None:
  """Splits the pmapped steps' global batch over `count` XLA:CPU devices (config.cpu_devices; 0: JAX's default, one
  or XLA_FLAGS' --xla_force_host_platform_device_count). Where one replica's layers are too small to keep a small
  CPU's cores busy, replicas side by side fill them. Call before JAX starts (its first computation or device query);
  later, JAX keeps the devices it has and this says so in one line. On GPU/TPU the CPU devices do not train."""
  if count < 0:
    raise UserError(f'config.cpu_devices={count}: expected a number of CPU devices >= 0 (0: JAX\'s default)')
  if not count:
    return
  if batch_size % count:
    raise UserError(f'config.batch_size={batch_size}: expected a multiple of config.cpu_devices ({count})')
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:   # JAX already started (a notebook, a test): the same maths on the devices it has
    have = len(jax.devices('cpu'))
    if have != count:
      print(f'config.cpu_devices={count}: JAX had already started with {have} CPU device(s); training on those',
            flush=True)


def replicate(tree):
  """A copy of every leaf per local device (leading axis = local devices), placed as pmap places its outputs.

  Placed by an identity pmap rather than handed over as host arrays: pmap keys its compiled programs on how the
  arguments are placed, so a train state given as numpy made the second call (whose state is the first call's
  output) trace, lower and compile the whole step again."""
  count = jax.local_device_count()
  stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count,) + np.shape(x)), jax.device_get(tree))
  return _identity(stacked)


_identity = jax.pmap(lambda tree: tree, axis_name=AXIS)


def unreplicate(tree):
  """The first replica of every leaf, fetched to host numpy arrays."""
  return jax.tree.map(lambda x: x[0], jax.device_get(tree))  # fetch, then index: no per-leaf device op


def is_main_process() -> bool:
  """Only process 0 writes checkpoints, logs, TensorBoard events and images."""
  return jax.process_index() == 0


def main_process_first(fn):
  """fn() on process 0, then, after a barrier, on the other processes: e.g. preparing the shared dataset cache once
  (the others then find it prepared). Single-process runs just call fn()."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  result = fn() if is_main_process() else None
  multihost_utils.sync_global_devices('oasis_jax: main process first')
  return result if is_main_process() else fn()


def global_row_sample(vectors, key, count: int):
  """`count` rows drawn uniformly from the global batch (all devices' `vectors` [n, D] stacked in device order).

  Called inside pmap: every replica gets the same rows, and 1 device holding the whole batch draws the same rows
  as 2 devices holding halves of it.
  """
  local = vectors.shape[0]
  devices = jax.lax.psum(1, AXIS)
  rows = jax.random.randint(key, (count,), 0, local * devices) - jax.lax.axis_index(AXIS) * local
  mine = (rows >= 0) & (rows < local)
  picked = vectors[jnp.clip(rows, 0, local - 1)]
  return jax.lax.psum(jnp.where(mine[:, None], picked, 0.0), AXIS)
