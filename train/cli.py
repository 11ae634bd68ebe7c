"""What every command-line entry point shares: argv parsing and one-line errors."""

from __future__ import annotations

from importlib import metadata
import os
import platform
import re
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


# XLA:CPU in jaxlib 0.10 hands dots, reductions and convolutions to YNNPACK (XLA's
# `xla_cpu_experimental_ynn_fusion_type` flag). YNNPACK's convolutions are slow here, their
# weight gradients (convolutions whose window spans the image) above all: on a 2-core Zen 3 CPU
# the UNet's 3x3 convolution at batch 64, 28x28, 48 -> 32 channels took 58-203 ms for dW
# through YNNPACK and 16-21 ms through XLA's own (Eigen) convolution (`python -m
# experiments.benchmark_ops`, with and without GENLAB_XLA_TUNING=0). This flag keeps YNNPACK
# for dots only: with its reductions kept too, DDIM sampling lost ~15% against diffusers.
# experiments/README.md ("Speed against PyTorch") has what the flag does to the UNet and DDIM
# against diffusers. The flag is known to jaxlib 0.8.3 to 0.10.x (checked in their wheels);
# other versions are left alone (an unknown flag in XLA_FLAGS aborts the process).
XLA_CPU_FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
_XLA_CPU_JAXLIB = ((0, 8, 3), (0, 11))


def tune_xla_cpu() -> bool:
  """Adds `XLA_CPU_FLAG` to XLA_FLAGS, before JAX starts its backends; True if it did.

  Nothing happens with GENLAB_XLA_TUNING=0, when XLA_FLAGS already names the flag (the
  user's choice wins), for a jaxlib outside the versions known to have it, or once JAX's
  backends are running (XLA reads XLA_FLAGS when they start). Other backends ignore it.
  """
  if (os.environ.get('GENLAB_XLA_TUNING') == '0'
      or 'xla_cpu_experimental_ynn_fusion_type' in os.environ.get('XLA_FLAGS', '')):
    return False
  try:
    version = tuple(int(x) for x in re.findall(r'\d+', metadata.version('jaxlib'))[:3])
  except metadata.PackageNotFoundError:
    return False
  if not _XLA_CPU_JAXLIB[0] <= version < _XLA_CPU_JAXLIB[1]:
    return False
  if 'jax' in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if getattr(xla_bridge, 'backends_are_initialized', lambda: False)():
      return False
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {XLA_CPU_FLAG}'.strip()
  return True


def tune_host() -> None:
  """What every entry point does first: `tune_xla_cpu`, then `tune_host_malloc`."""
  tune_xla_cpu()
  tune_host_malloc()


def run(main: Callable[[Sequence[str]], None], *, config_overrides: bool = False) -> None:
  """`absl.app.run(main)`, but user errors print one line and exit 1, with no traceback.

  With `config_overrides`, `--config.KEY=VALUE` arguments are taken out of argv before absl
  parses it and handed to `main` as `train.cli.OVERRIDES`. The process first re-executes
  itself with tuned glibc malloc settings, after adding XLA's CPU flag (`tune_host`).
  """
  tune_host()
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
