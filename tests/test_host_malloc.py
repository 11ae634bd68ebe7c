"""Command-line entry points re-execute themselves with glibc malloc tunables that stop the
per-step mmap/munmap churn of large temporaries (train.cli.tune_host_malloc)."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc',
                                reason='glibc malloc tunables are Linux/glibc only')

# A command that reports its GLIBC_TUNABLES and the minor page faults of 40 allocations of
# 64 MiB, each filled and freed (what XLA:CPU's per-step temporaries do).
_CHILD = """
import os, resource, sys
from train import cli
def main(argv):
  import numpy as np
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(40):
    a = np.empty(16 * 2**20, np.float32)
    a.fill(1.0)
    del a
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), faults, ' '.join(argv[1:]))
cli.run(main)
"""


def _run(env_updates, *args):
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'GENLAB_MALLOC_TUNING')}
  env.update(env_updates)
  out = subprocess.run([sys.executable, '-c', _CHILD, *args], env=env, capture_output=True,
                       text=True, timeout=120, check=True).stdout.split(maxsplit=3)
  return out[1], int(out[2]), out[3] if len(out) > 3 else ''


def test_entry_point_reexecs_with_tunables_and_stops_the_page_fault_churn():
  tunables, faults, argv = _run({}, 'a', 'b c')
  assert tunables is not None and 'glibc.malloc.mmap_threshold=2147483647' in tunables
  assert argv.strip() == 'a b c'  # argv survives the re-exec
  _, untuned_faults, _ = _run({'GENLAB_MALLOC_TUNING': '0'})
  # Without tuning every 64 MiB block is mapped afresh and faulted in page by page (4 KiB, or
  # 2 MiB with transparent huge pages); with it the freed block is reused, so only the first
  # allocation faults.
  assert untuned_faults >= 40, untuned_faults
  assert faults * 10 < untuned_faults, (faults, untuned_faults)


def test_opt_out_and_existing_tunables_are_kept():
  tunables, _, _ = _run({'GENLAB_MALLOC_TUNING': '0'})
  assert tunables == 'None'
  tunables, _, _ = _run({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert tunables.startswith('glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=')
