"""The one error type for bad user input.

Command-line entry points catch `UserError` and print its message as ONE line (no traceback)
before exiting non-zero, so every message must name the culprit: the flag, config key, path or
step that is wrong, and what would fix it.
"""


class UserError(Exception):
  """Bad input from the user (config, flags, data, workdir); printed as one line."""
