"""What every command-line entry point shares: argv parsing and one-line errors."""

from __future__ import annotations

import os
import platform
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from train.errors import UserError


# glibc malloc hands blocks above its mmap threshold (128 KiB, rising to at most 32 MiB) back
# to the kernel on free and trims the heap top: XLA:CPU's per-step temporaries are then mapped,
# page-faulted in and unmapped again at every step. Raising both thresholds past any allocation
# keeps freed memory in the process. On a 2-core Zen 4 CPU, `/usr/bin/time -v python -m train
# --config=experiments/configs/gpt_shakespeare.py --workdir=W --config.total_steps=700` made
# 8.2M minor page faults and 20.3 s of system CPU time under GENLAB_MALLOC_TUNING=0, and 1.9M
# and 5.8 s tuned (user time 78 s both; peak RSS 851 vs 887 MB). glibc reads these tunables only
# at process start, and `mallopt` caps the threshold at 32 MiB (which changed nothing here),
# hence a re-exec.
MALLOC_TUNABLES = 'glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=2147483647'


def tune_host_malloc() -> None:
  """Re-executes this process once with `MALLOC_TUNABLES` in GLIBC_TUNABLES (Linux, glibc).

  Nothing happens when GLIBC_TUNABLES already sets an mmap threshold (e.g. after the re-exec),
  on other platforms, or with GENLAB_MALLOC_TUNING=0. The process keeps its PID, argv and
  environment, so launchers, SLURM and signals see no difference.
  """
  if (sys.platform != 'linux' or os.environ.get('GENLAB_MALLOC_TUNING') == '0'
      or 'glibc.malloc.mmap_threshold' in os.environ.get('GLIBC_TUNABLES', '')
      or platform.libc_ver()[0] != 'glibc'):
    return
  env = dict(os.environ)
  env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES'), MALLOC_TUNABLES]))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError:
    pass  # run on with glibc's defaults


def run(main: Callable[[Sequence[str]], None], *, config_overrides: bool = False) -> None:
  """`absl.app.run(main)`, but user errors print one line and exit 1, with no traceback.

  With `config_overrides`, `--config.KEY=VALUE` arguments are taken out of argv before absl
  parses it and handed to `main` as `train.cli.OVERRIDES`. The process first re-executes
  itself with tuned glibc malloc settings (`tune_host_malloc`).
  """
  tune_host_malloc()
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
