"""What every command-line entry point shares: argv parsing and one-line errors."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from train.errors import UserError


def run(main: Callable[[Sequence[str]], None], *, config_overrides: bool = False) -> None:
  """`absl.app.run(main)`, but user errors print one line and exit 1, with no traceback.

  With `config_overrides`, `--config.KEY=VALUE` arguments are taken out of argv before absl
  parses it and handed to `main` as `train.cli.OVERRIDES`.
  """
  def parse(argv):
    global OVERRIDES
    try:
      if config_overrides:
        from train import config as config_lib  # pylint: disable=import-outside-toplevel
        argv, OVERRIDES = config_lib.split_overrides(argv)
      argv = flags.FLAGS(argv)
      if not flags.FLAGS['verbosity'].present:
        # Orbax and TFDS log every file operation at INFO; the loop prints its own progress.
        logging.set_verbosity(logging.WARNING)
      return argv
    except (UserError, flags.Error) as e:
      _die(str(e))

  def wrapped(argv):
    try:
      main(argv)
    except UserError as e:
      _die(str(e))
    except KeyboardInterrupt:
      _die('interrupted')

  app.run(wrapped, flags_parser=parse)


OVERRIDES: list[tuple[str, str]] = []


def _die(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(1)
