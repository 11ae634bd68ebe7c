"""Test setup: 8 fake CPU devices (set before JAX is imported) and data locations from the env.

CI sets TFDS_DATA_DIR to a prepared TFDS data_dir (../shared/data/tfds) and GENLAB_RAW_DATA to
the raw files (../shared/data). Tests that need them are skipped with a reason when a variable
is unset (a checkout without the data); when one is set but its directory is missing, the whole
run stops at once with one line saying so (nothing tries to download, nothing skips silently).
"""

import os

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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


@pytest.fixture(scope='session')
def alignment_sft(tmp_path_factory):
  """The tiny SFT run and its preference pairs that tests/test_alignment.py and test_rlhf.py
  share: made once per test process."""
  from tests import test_alignment  # pylint: disable=import-outside-toplevel
  return test_alignment.make_sft(tmp_path_factory.mktemp('alignment'))
