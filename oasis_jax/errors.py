"""The exception type for problems a user can fix (bad data, bad config, missing files), and the one that ends a
run stopped by a signal.

A UserError has a one-line message that names the file or config field and what was expected; the CLI scripts
turn it into `sys.exit(message)`. Everything else is a bug and may trace back, except a full disk (`no_space_left`).
"""
import contextlib
import errno


class UserError(Exception):
  """A problem with the user's input: data, config or files. The message is one line."""


def check_choice(config, field: str, choices, default=None) -> None:
  """A UserError naming config.<field> and the choices when its value (default where the config lacks the field) is
  not one of them."""
  value = config.get(field, default)
  if value not in choices:
    expected = ' or '.join(choices) if len(choices) == 2 else 'one of ' + ', '.join(choices)
    raise UserError(f'config.{field}={value!r}: expected {expected}')


class DiskFull(UserError):
  """A write failed for want of space; the message names what was being written."""


class Stopped(Exception):
  """A training run stopped by SIGTERM or SIGINT after saving a complete checkpoint; the CLIs exit with
  128 + the signal's number, as a process killed by it would."""

  def __init__(self, message: str, signal_number: int):
    super().__init__(message)
    self.signal_number = signal_number


def no_space_left(error: BaseException) -> tuple[bool, str]:
  """(whether error, or an exception it was raised from or during, is a full disk; the file named, or '').
  Orbax and tensorstore wrap the OSError or only quote its text."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True, error.filename or ''
    if 'No space left on device' in str(error):
      return True, ''
    error = error.__cause__ or error.__context__
  return False, ''


FREE_SPACE = 'free some space and run the same command again (a training run resumes from its newest complete checkpoint)'


@contextlib.contextmanager
def naming_full_disk(path: str, writing: str = ''):
  """Turns a full disk while writing path (`writing`: what, for the message) into a DiskFull that names it."""
  try:
    yield
  except Exception as error:   # an OSError, or a library's wrapper of one (orbax, tensorstore)
    if not no_space_left(error)[0]:
      raise
    raise DiskFull(full_disk_message(path, writing)) from None


def full_disk_message(path: str, writing: str = '') -> str:
  return f'{path}: no space left on device{writing}; {FREE_SPACE}'
