"""`load_models(workdir)`: a run directory's family and networks, restored onto one device.

Used by `python -m train.sample`, `train.evaluate`, `train.export`, `train.quantize` and by
families that read another run (the RAG generator's dense retriever); it defines no flags, so a
command that trains can import it.
"""

from __future__ import annotations

import json

import jax

from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import families
from train import loop
from train import storage
from train import tuned_checkpoint as tuned_ckpt
from train.errors import UserError


def load_models(workdir: str, use_ema: bool = True, *, name: str = '--workdir'):
  """The family, its networks (EMA params where kept, unless use_ema=False) and the step of
  `workdir`'s latest checkpoint, restored onto one device. `name`: what the user called the
  run (a flag or a config key), which the errors name."""
  culprit = f'{name}={workdir}'
  config_path = storage.join(workdir, 'config.json')
  if not storage.isfile(config_path):
    raise UserError(f'{culprit}: no config.json; is it a `python -m train` workdir?')
  config = config_lib.from_json(json.dumps(storage.read_json(config_path, culprit)))
  if not isinstance(config.get('family'), str):
    raise UserError(f'{culprit}: {config_path} is damaged (it names no `family`)')
  metadata = storage.read_json(storage.join(workdir, 'family.json'), culprit)
  checkpoint_dir = storage.join(workdir, 'checkpoints')
  if not storage.isdir(checkpoint_dir):  # (a Checkpointer would create it)
    raise UserError(f'{culprit}: no checkpoint in {storage.absolute(checkpoint_dir)}')
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, async_save=False)
  step = checkpointer.latest_step()
  if step is None:
    raise UserError(f'{culprit}: no checkpoint in {checkpointer.directory}')
  family_class = families.get(config.family)
  try:
    family = family_class(config)
    family.load_metadata(metadata)
    family.read_run_files(workdir)
    builder = loop.StateBuilder(family, config)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # A run written by an older version of the family's code lacks keys the code now reads.
    raise UserError(f'{culprit}: its config.json or family.json lacks or garbles {e} that '
                    f'family {config.family!r} needs (damaged, or written by an older version '
                    'of genlab?)') from None
  # Whatever mesh wrote the checkpoint, sampling restores it onto one device.
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: one_device, builder.abstract)
  try:
    # A tuned run's checkpoint holds what it trained; its frozen params are its base run's.
    state, _ = tuned_ckpt.restore(checkpointer, step, builder, shardings, metadata)
  finally:
    checkpointer.close()
  params = builder.sampling_params(state) if use_ema else state['params']
  return family, builder.models(params, state['rest']), step


def load_run_of(family_name: str, run: str, name: str):
  """`load_models(run)` of a run that a flag or config key `name` (e.g. '--classifier',
  'config.rag.retriever_run') gives, which must be a run of family `family_name`; UserError
  naming `name` otherwise."""
  if not storage.isdir(run):
    raise UserError(f'{name}={run}: no such directory')
  family, models, step = load_models(run, name=name)
  if family.name != family_name:
    raise UserError(f'{name}={run}: a {family.name!r} run, not a {family_name} run')
  return family, models, step
