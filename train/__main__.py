"""`python -m train --config=experiments/configs/X.py[:ARG] --workdir=DIR [--config.KEY=VALUE]`.

Trains, or resumes from DIR's latest checkpoint when the same command runs again. Several
processes (hosts) run the same command; `train/distributed.py` joins them into one JAX runtime
from --coordinator_address/--num_processes/--process_id, or from SLURM / Cloud TPU on its own.
"""

from absl import flags

from train import cli
from train import config as config_lib
from train import distributed
from train import loop
from train.errors import UserError

_CONFIG = flags.DEFINE_string('config', None, 'Config file, path.py[:ARG].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, samples.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 in a multi-process job without SLURM '
    'or Cloud TPU (which are detected); with --num_processes and --process_id.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _CONFIG.value:
    raise UserError('--config is required, e.g. --config=experiments/configs/gpt_shakespeare.py')
  if not _WORKDIR.value:
    raise UserError('--workdir is required')
  config = config_lib.apply_overrides(config_lib.load(_CONFIG.value), cli.OVERRIDES)
  # Before anything touches a JAX backend.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    loop.train(config, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    raise UserError(str(e)) from None


if __name__ == '__main__':
  cli.run(main, config_overrides=True)
