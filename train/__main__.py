"""`python -m train --config=experiments/configs/X.py[:ARG] --workdir=DIR [--config.KEY=VALUE]`.

Trains, or resumes from DIR's latest checkpoint when the same command runs again.
"""

from absl import flags

from train import cli
from train import config as config_lib
from train import loop
from train.errors import UserError

_CONFIG = flags.DEFINE_string('config', None, 'Config file, path.py[:ARG].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, samples.')


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _CONFIG.value:
    raise UserError('--config is required, e.g. --config=experiments/configs/gpt_shakespeare.py')
  if not _WORKDIR.value:
    raise UserError('--workdir is required')
  config = config_lib.apply_overrides(config_lib.load(_CONFIG.value), cli.OVERRIDES)
  try:
    loop.train(config, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    raise UserError(str(e)) from None


if __name__ == '__main__':
  cli.run(main, config_overrides=True)
