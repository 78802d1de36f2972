"""The exception type for problems a user can fix (bad data, bad config, missing files), and the one that ends a
run stopped by a signal.

A UserError has a one-line message that names the file or config field and what was expected; the CLI scripts
turn it into `sys.exit(message)`. Everything else is a bug and may trace back.
"""


class UserError(Exception):
  """A problem with the user's input: data, config or files. The message is one line."""


class Stopped(Exception):
  """A training run stopped by SIGTERM or SIGINT after saving a complete checkpoint; the CLIs exit with
  128 + the signal's number, as a process killed by it would."""

  def __init__(self, message: str, signal_number: int):
    super().__init__(message)
    self.signal_number = signal_number
