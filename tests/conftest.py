"""Test setup: 8 fake CPU devices (set before JAX is imported) and data locations from the env.

CI sets TFDS_DATA_DIR to a prepared TFDS data_dir (../shared/data/tfds) and GENLAB_RAW_DATA to
the raw files (../shared/data). Tests that need them are skipped with a reason when a variable
is unset (a checkout without the data); when one is set but its directory is missing, the whole
run stops at once with one line saying so (nothing tries to download, nothing skips silently).

The run shares one persistent JAX compilation cache (a temporary directory, deleted at the end)
between its xdist workers and the processes the command-line tests start: many tests compile
the same tiny programs (a run and its resume, a train run and `train.sample`), and a process
that finds a program in the cache reads it back instead of compiling it again. A
JAX_COMPILATION_CACHE_DIR already in the environment is used as is and kept. The same goes for
GENLAB_CACHE_DIR (`train.data.load_images`): MNIST is decoded once for the whole run, not once
in every worker and command-line process that reads it (~10 s each on a 2-core host).

The command-line tests' processes also start with `train.cli.MALLOC_TUNABLES` in
GLIBC_TUNABLES, so they run with the malloc settings every entry point sets for itself without
re-executing themselves (which imports JAX and the entry point's modules a second time).
tests/test_host_malloc.py tests the re-execution with these variables removed.

Programs are compiled with JAX's `jax_disable_most_optimizations` (JAX_DISABLE_MOST_OPTIMIZATIONS,
LLVM at -O0 without its expensive passes; XLA's graph passes still run): the suite's programs
are tiny and run for a few steps, so compiling dominates its time, and compiling them this way
takes about a third less CPU (the whole suite with -n 2: ~2,400 -> 1,601 s of user CPU;
test_diffusion's train/resume/sample test alone: 156 -> 97 s).
Every equality a test asserts holds between programs compiled the same way; set the variable
to 0 to run the suite with the optimizations users get.

Under pytest-xdist (setup.cfg adds `--dist loadgroup`), the tests that share a module- or
session-scoped fixture of this suite (e.g. a small training run that several tests read) are
marked with one `xdist_group`, so they run on one worker and the fixture is made once, not
once per worker that happens to get one of its tests; every other test is dealt out one at a
time. pytest 9.2 broke xdist's grouping (pytest-xdist issue #1386: the marks are silently
ignored), hence the `pytest<9.2` of setup.cfg's test extra.
"""

import os
import shutil
import tempfile

import pytest

from train.cli import MALLOC_TUNABLES, tune_xla_cpu

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
tune_xla_cpu()  # XLA's CPU flag, as every entry point adds it (train.cli.run)

# The directory this process created (the controller, or a run without xdist); workers and
# subprocesses inherit the variable and share it. Set before JAX is imported: JAX reads these
# variables once, at import. Every compiled program is cached (by default only those that took
# over a second to compile: most of this suite's programs take less, and each is compiled
# again by several tests and processes).
_OWN_COMPILATION_CACHE = None
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  _OWN_COMPILATION_CACHE = tempfile.mkdtemp(prefix='genlab-tests-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_COMPILATION_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

_OWN_IMAGE_CACHE = None
if not os.environ.get('GENLAB_CACHE_DIR'):
  _OWN_IMAGE_CACHE = tempfile.mkdtemp(prefix='genlab-tests-image-cache-')
  os.environ['GENLAB_CACHE_DIR'] = _OWN_IMAGE_CACHE

if 'glibc.malloc.mmap_threshold' not in os.environ.get('GLIBC_TUNABLES', ''):
  os.environ['GLIBC_TUNABLES'] = ':'.join(
      filter(None, [os.environ.get('GLIBC_TUNABLES'), MALLOC_TUNABLES]))

DATA_VARIABLES = {'TFDS_DATA_DIR': 'a prepared TFDS data_dir (CI: ../shared/data/tfds)',
                  'GENLAB_RAW_DATA': 'the raw data files (CI: ../shared/data)'}

needs_data = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir with mnist) is not set')


def pytest_configure(config):
  del config
  for var, what in DATA_VARIABLES.items():
    value = os.environ.get(var)
    if value and not os.path.isdir(value):
      raise pytest.UsageError(f'{var}={value}: no such directory ({os.path.abspath(value)}); '
                              f'point it at {what}, or unset it to skip the tests that need it')


def pytest_unconfigure(config):
  del config
  for own in (_OWN_COMPILATION_CACHE, _OWN_IMAGE_CACHE):
    if own:
      shutil.rmtree(own, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (with --dist loadgroup)
def pytest_collection_modifyitems(config, items):
  """One xdist_group per set of tests linked by the module- or session-scoped fixtures of this
  suite that they use (connected components: a test using two such fixtures joins their sets)."""
  del config
  parent = {}

  def root(key):
    while parent.setdefault(key, key) != key:
      key = parent[key]
    return key

  linked = []
  for item in items:
    info = getattr(item, '_fixtureinfo', None)
    keys = []
    for name, definitions in (info.name2fixturedefs.items() if info else ()):
      definition = definitions[-1]
      if definition.baseid and definition.scope in ('module', 'session'):  # ours, not pytest's
        owner = item.module.__name__ if definition.scope == 'module' else definition.baseid
        keys.append(f'{owner}.{name}')
    for key in keys[1:]:
      parent[root(key)] = root(keys[0])
    linked.append((item, keys))
  for item, keys in linked:
    if keys:
      item.add_marker(pytest.mark.xdist_group(root(keys[0])))


@pytest.fixture(scope='session')
def alignment_sft(tmp_path_factory):
  """The tiny SFT run and its preference pairs that tests/test_alignment.py and test_rlhf.py
  share: made once per test process."""
  from tests import test_alignment  # pylint: disable=import-outside-toplevel
  return test_alignment.make_sft(tmp_path_factory.mktemp('alignment'))
