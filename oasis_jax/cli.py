"""The boundary between the top-level scripts and the package: user errors become one line and exit status 1."""
import ctypes
import ctypes.util
import os
import re
import sys

from absl import app, flags, logging

from oasis_jax.errors import DiskFull, Stopped, UserError, full_disk_message, no_space_left


def run(main):
  """Wraps an absl main: a UserError (or a bad config field) or a full disk prints one line on stderr, no traceback;
  a run stopped by a signal prints its one line and exits with 128 + the signal number."""

  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax, TFDS) hides the progress lines
    try:
      initialize_distributed()
      enable_compilation_cache()
      return main(argv)
    except UserError as error:
      if isinstance(error, DiskFull):
        _quiet_shutdown()
      sys.exit(f'error: {error}')
    except Stopped as stopped:
      print(stopped, file=sys.stderr, flush=True)
      sys.exit(128 + stopped.signal_number)
    except Exception as error:   # a full disk while writing an image, a log or the samples: one line too
      full, file = no_space_left(error)
      if not full:
        raise
      _quiet_shutdown()
      sys.exit(f'error: {full_disk_message(file or "a file")}')
  return wrapped


def _quiet_shutdown() -> None:
  """The run ends on a full disk: background writers (TensorBoard's at exit, orbax's reads and writes) fail again as
  the process exits, and their tracebacks would bury the one line that says why."""
  import threading
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda unraisable: None   # also what an exception in an atexit callback goes through


def define_distributed_flags() -> None:
  """Flags of the training scripts for multi-process runs (one process per host, as on Cloud TPU pods or SLURM)."""
  flags.DEFINE_string('coordinator_address', os.environ.get('OASIS_JAX_COORDINATOR'),
                      'host:port of process 0 for a multi-process run (jax.distributed); "auto" lets JAX read it '
                      'from the environment (Cloud TPU, SLURM, ...). Unset: one process.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address=host:port).')
  flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 (with --coordinator_address).')


def initialize_distributed() -> None:
  """jax.distributed.initialize from the flags above, where the script defines them and one is set."""
  address = flags.FLAGS['coordinator_address'].value if 'coordinator_address' in flags.FLAGS else None
  if not address:
    return
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')   # CPU collectives across processes
  if address == 'auto':
    jax.distributed.initialize()
    return
  count, index = flags.FLAGS.num_processes, flags.FLAGS.process_id
  if count is None or index is None or not 0 <= index < count:
    raise UserError(f'--coordinator_address={address}: expected --num_processes=N and --process_id in [0, N)')
  jax.distributed.initialize(address, count, index)


def parse_flags(argv):
  """absl's flag parsing (pass as app.run(main, flags_parser=cli.parse_flags)), with a one-line error for a
  --config.FIELD override naming a field the config does not have (ml_collections raises AttributeError)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    # ml_collections' message: "'name'", then possibly a line 'Did you mean "x" instead of "name"?'.
    while error.args and isinstance(error.args[0], BaseException):   # an AttributeError wraps the KeyError
      error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    first, _, rest = text.partition('\n')
    name = first.strip('"\'')
    close = re.search(r'Did you mean "([^"]+)"', rest)
    hint = f'; did you mean {close.group(1)}?' if close else ''
    culprit = next((a.split('=')[0] for a in argv[1:] if a.startswith('--config.') and name in a.split('=')[0]),
                   f'--config.{name}')
    sys.exit(f'error: {culprit}: unknown config field {name!r} (the config file lists the fields{hint})')


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache under the oasis_jax cache dir: later runs skip most XLA compiles."""
  import jax
  from oasis_jax.paths import default_cache_dir
  jax.config.update('jax_compilation_cache_dir', os.path.join(default_cache_dir(), 'jax_compilation_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def keep_freed_memory() -> bool:
  """Has glibc's malloc keep the memory this process frees and serve later requests from it; call it before JAX
  starts. For the commands whose work runs on one device (evaluate, sample.py, train_vqvae.py): XLA:CPU's matrix
  products pack their operands into buffers that its worker threads allocate at every call, glibc maps each afresh,
  and the kernel then maps it in page by page (about 5 million page faults in the demo's stage-2 evaluation, most of
  its 12 s of system time). One arena, no mmap and no trimming serve them from memory already mapped, for a larger
  peak (docs/performance.md has both). Not for train_gan.py: its two devices' replicas allocate at once and wait for
  the one arena. Returns whether it applied (False where the C library is not glibc)."""
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c')).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8   # glibc's <malloc.h>
  return all(mallopt(option, value) == 1 for option, value in
             ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2 ** 31 - 1)))


def check_workdir(workdir: str, flag: str = '--workdir') -> str:
  if not workdir:
    raise UserError(f'{flag} is required: the directory for checkpoints, logs and images')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'{workdir}: {flag} exists and is not a directory')
  return workdir
