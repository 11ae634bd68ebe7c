"""Test setup: 8 fake CPU devices (set before JAX is imported) and data locations from the env.

CI sets TFDS_DATA_DIR to a prepared TFDS data_dir (../shared/data/tfds) and GENLAB_RAW_DATA to
the raw files (../shared/data); tests that need them are skipped with a reason otherwise.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
