"""A config file for `python -m train` that trains `tests.toy_families`' regression: no dataset.

  python -m train --config=tests/toy_config.py --workdir=DIR [--config.KEY=VALUE ...]
"""

from tests import toy_families  # registers the toy families in the process that loads this


def get_config(arg=None):
  del arg
  return toy_families.regression_config()
