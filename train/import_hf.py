"""`python -m train.import_hf --hf_dir=HF_DIR --out=DIR`: a Hugging Face GPT-2 as a genlab run.

HF_DIR is what the Hub serves for a GPT-2 (e.g. openai-community/gpt2): config.json,
model.safetensors and tokenizer.json. DIR becomes a run directory of the `gpt` family, as if
training had written it: config.json (experiments/configs/gpt_pretrained.py filled in with the
model's shape), family.json, the model's tokenizer.json, and checkpoint 0 holding the pretrained
weights with a fresh optimizer state. `python -m train.sample --workdir=DIR` samples from it,
and `python -m train --config=experiments/configs/gpt_pretrained.py:DIR --workdir=DIR` fine-tunes
it (resuming from checkpoint 0). `python -m train.export_hf` goes back.

Reads the weights with `safetensors.numpy`: neither torch nor transformers is needed.
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags
from flax import nnx

from experiments.configs import gpt_pretrained
from train import checkpoint as ckpt_lib
from train import cli
from train import config as config_lib
from train import families
from train import hf_gpt2
from train import loop
from train import storage
from train import text as text_lib
from train.errors import UserError


def read_weights(hf_dir: str, model: dict) -> dict:
  """genlab param path -> float32 array, from HF_DIR/model.safetensors."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=import-outside-toplevel
  path = os.path.join(hf_dir, hf_gpt2.WEIGHTS_FILE)
  try:
    tensors = safetensors_numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
    raise UserError(f'{path}: cannot read it ({type(e).__name__}: '
                    f'{str(e).splitlines()[0][:200] if str(e) else ""})') from None
  return hf_gpt2.to_genlab(tensors, model, path)


def _dropout(hf_config: dict, given: float | None, path: str) -> float:
  if given is not None:
    if not 0.0 <= given < 1.0:
      raise UserError(f'--dropout={given}: must be in [0, 1)')
    return given
  rates = {k: float(hf_config.get(k, 0.1)) for k in ('resid_pdrop', 'embd_pdrop', 'attn_pdrop')}
  if len(set(rates.values())) > 1:
    raise UserError(f'{path}: dropout rates differ ({rates}); genlab has one: pass --dropout')
  return rates['resid_pdrop']


def import_gpt2(hf_dir: str, out: str, dropout: float | None = None) -> str:
  """Writes the run directory `out` from `hf_dir`; returns a one-line summary."""
  hf_gpt2.check_dir(hf_dir)
  config_path = os.path.join(hf_dir, hf_gpt2.CONFIG_FILE)
  hf_config = hf_gpt2.read_config(hf_dir)
  model = hf_gpt2.model_settings(hf_config, config_path)
  loop.check_workdir(out)
  checkpoint_dir = storage.join(out, 'checkpoints')
  if storage.isdir(checkpoint_dir):
    existing = ckpt_lib.Checkpointer(checkpoint_dir, async_save=False)
    latest = existing.latest_step()
    existing.close()
    if latest is not None:
      raise UserError(f'--out={out}: already holds checkpoint {latest}; use a new directory')

  tokenizer_path = os.path.join(hf_dir, hf_gpt2.TOKENIZER_FILE)
  raw = text_lib.read_tokenizer_file(tokenizer_path)
  # The end-of-text token: config.json's eos_token_id (GPT-2: 50256, <|endoftext|>).
  eos_id = hf_config.get('eos_token_id')
  eos_token = (raw.id_to_token(eos_id) if isinstance(eos_id, int) else None) or '<|endoftext|>'
  try:
    tokenizer = text_lib.PretrainedTokenizer(raw, eos_token)
  except ValueError as e:
    raise UserError(f'{tokenizer_path}: {e} (the end-of-text token, eos_token_id in '
                    f'{config_path})') from None
  if tokenizer.vocab_size > model['vocab_size']:
    raise UserError(f'{tokenizer_path}: {tokenizer.vocab_size} tokens, more than the model\'s '
                    f'vocab_size {model["vocab_size"]} ({config_path})')
  params = read_weights(hf_dir, model)

  config = gpt_pretrained.get_config()
  config.model.update(block_size=model['block_size'], num_layers=model['num_layers'],
                      num_heads=model['num_heads'], embed_dim=model['embed_dim'],
                      vocab_size=model['vocab_size'], activation=model['activation'],
                      init_std=model['init_std'],
                      dropout=_dropout(hf_config, dropout, config_path))
  config.data.tokenizer_file = storage.absolute(storage.join(out, text_lib.TOKENIZER_FILE))
  config.data.eos_token = eos_token
  config.lock()

  family = families.get('gpt')(config)
  family.tokenizer = tokenizer
  builder = loop.StateBuilder(family, config)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = builder.init(jax.tree.map(lambda _: one_device, builder.abstract))
  state['params']['model'] = _with_params(state['params']['model'], params)
  if 'ema' in state:
    state['ema']['model'] = state['params']['model']

  loop.prepare_workdir(out)
  text_lib.save_in_workdir(tokenizer, out)
  storage.write_text(storage.join(out, 'config.json'), config_lib.to_json(config))
  storage.write_text(storage.join(out, 'family.json'), json.dumps(family.metadata()))
  # The checkpoint last: a run directory with a checkpoint is complete.
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, async_save=False)
  checkpointer.save(0, state, {'data_step': 0, 'family': family.name})
  checkpointer.close()
  n = loop.num_params(builder.abstract['params'])
  return (f'imported {hf_dir} ({model["num_layers"]} layers, width {model["embed_dim"]}, '
          f'{n:,} params) into {out} as checkpoint 0')


def _with_params(state: nnx.State, params: dict) -> nnx.State:
  """`state` with every param replaced by params[path] (path as 'blocks/0/attn/qkv/kernel')."""
  left = dict(params)

  def replace(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator='/').removesuffix('/value')
    if name not in left:
      raise ValueError(f'genlab param {name} has no counterpart in the checkpoint')
    value = left.pop(name)
    if value.shape != leaf.shape:
      raise ValueError(f'param {name}: {value.shape} from the checkpoint, {leaf.shape} in genlab')
    return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

  state = jax.tree_util.tree_map_with_path(replace, state)
  if left:
    raise ValueError(f'checkpoint tensors left over: {sorted(left)[:3]}')
  return state


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if not f.hf_dir:
    raise UserError('--hf_dir is required (a Hugging Face GPT-2 directory)')
  if not f.out:
    raise UserError('--out is required (the run directory to write)')
  print(import_gpt2(f.hf_dir, f.out, f.dropout), flush=True)


if __name__ == '__main__':
  # Defined here rather than on import, so that this module and train.sample (whose --out is
  # an image path) can be imported together, e.g. by tests.
  flags.DEFINE_string('hf_dir', None, 'A Hugging Face GPT-2 directory (config.json, '
                      'model.safetensors, tokenizer.json).')
  flags.DEFINE_string('out', None, 'The run directory to write (must hold no checkpoint).')
  flags.DEFINE_float('dropout', None, 'Dropout for fine-tuning (default: the checkpoint\'s '
                     'resid_pdrop, embd_pdrop and attn_pdrop when equal).')
  cli.run(main)
