"""The boundary between the top-level scripts and the package: user errors become one line and exit status 1."""
import os
import sys

from absl import app, logging

from oasis_jax.errors import UserError


def run(main):
  """Wraps an absl main: a UserError (or a bad config field) prints one line on stderr, no traceback."""

  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax, TFDS) hides the progress lines
    enable_compilation_cache()
    try:
      return main(argv)
    except UserError as error:
      sys.exit(f'error: {error}')
  return wrapped


def parse_flags(argv):
  """absl's flag parsing (pass as app.run(main, flags_parser=cli.parse_flags)), with a one-line error for a
  --config.FIELD override naming a field the config does not have (ml_collections raises AttributeError)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    name = str(error).strip('"\'')
    culprit = next((a.split('=')[0] for a in argv[1:] if a.startswith('--config.') and name in a.split('=')[0]),
                   f'--config.{name}')
    sys.exit(f'error: {culprit}: unknown config field {name!r} (the config file lists the fields)')


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache under the oasis_jax cache dir: later runs skip most XLA compiles."""
  import jax
  from oasis_jax.tfds_oasis import default_cache_dir
  jax.config.update('jax_compilation_cache_dir', os.path.join(default_cache_dir(), 'jax_compilation_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def check_workdir(workdir: str, flag: str = '--workdir') -> str:
  if not workdir:
    raise UserError(f'{flag} is required: the directory for checkpoints, logs and images')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'{workdir}: {flag} exists and is not a directory')
  return workdir
