"""The one exception type for problems a user can fix (bad data, bad config, missing files).

Raised with a one-line message that names the file or config field and what was expected; the CLI scripts
turn it into `sys.exit(message)`. Everything else is a bug and may trace back.
"""


class UserError(Exception):
  """A problem with the user's input: data, config or files. The message is one line."""
