"""`python -m train.sample --workdir=DIR [--seed=S] [--num_samples=N] [--prompt=TEXT] ...`.

Loads DIR's latest checkpoint (EMA weights when the run kept them) and prints samples. The same
seed gives the same output; `--temperature=0` is greedy decoding.
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags

from train import checkpoint as ckpt_lib
from train import cli
from train import config as config_lib
from train import families
from train import loop
from train.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run directory written by `python -m train`.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'How many samples.')
_PROMPT = flags.DEFINE_string('prompt', '\n', 'Text to continue (language models).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 500, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Keep only the k most likely tokens.')
_TOP_P = flags.DEFINE_float('top_p', None, 'Nucleus sampling: keep the smallest set of tokens '
                            'whose probability reaches p, in (0, 1].')


def load_models(workdir: str):
  """The family and its networks (EMA params where kept) from `workdir`'s latest checkpoint."""
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise UserError(f'--workdir={workdir}: no config.json; is it a `python -m train` workdir?')
  with open(config_path, encoding='utf-8') as f:
    config = config_lib.from_json(f.read())
  family = families.get(config.family)(config)
  with open(os.path.join(workdir, 'family.json'), encoding='utf-8') as f:
    family.load_metadata(json.load(f))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  step = checkpointer.latest_step()
  if step is None:
    raise UserError(f'--workdir={workdir}: no checkpoint in {checkpointer.directory}')
  builder = loop.StateBuilder(family, config)
  # Whatever mesh wrote the checkpoint, sampling restores it onto one device.
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: one_device, builder.abstract)
  state, _ = checkpointer.restore(step, ckpt_lib.abstract_with_shardings(builder.abstract, shardings))
  checkpointer.close()
  return family, builder.models(builder.sampling_params(state), state['rest']), step


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    raise UserError('--workdir is required')
  family, models, step = load_models(_WORKDIR.value)
  texts = family.generate_text(
      models['model'], jax.random.key(_SEED.value), prompt=_PROMPT.value,
      num_samples=_NUM_SAMPLES.value, max_new_tokens=_MAX_NEW_TOKENS.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  print(f'# {family.name} samples from step {step} of {_WORKDIR.value}', flush=True)
  print('\n\n-----\n'.join(texts), flush=True)


if __name__ == '__main__':
  cli.run(main)
