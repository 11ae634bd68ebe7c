"""Hugging Face GPT-2 checkpoints <-> genlab's GPT (models/gpt.py): names, layouts, config.

What a user downloads from the Hub (e.g. openai-community/gpt2) is a directory holding
`config.json` (a `GPT2Config`), `model.safetensors` and `tokenizer.json` (a byte-level BPE file
of the `tokenizers` library). This module maps between that and genlab's param tree with numpy
only (`safetensors.numpy`): neither torch nor transformers is needed.

The two architectures are the same function (transformers' models/gpt2/modeling_gpt2.py):
pre-LayerNorm blocks with eps 1e-5, learned positions (`wpe`), biases everywhere, the output
layer tied to `wte`, attention scaled by 1/sqrt(head_dim), and the MLP's tanh-approximate GELU
("gelu_new", genlab's `activation='gelu_tanh'`). The layouts differ in one place: GPT-2's
`Conv1D` weights are `[in, out]` like nnx.Linear's kernels, but its fused `c_attn` columns are
ordered `[3, heads, head_dim]` (all queries, then all keys, then all values) where genlab's
`qkv` columns are head-major `[heads, 3, head_dim]` (models/layers.py): they are permuted.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from train.errors import UserError

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
TOKENIZER_FILE = 'tokenizer.json'

# transformers' activation names (transformers/activations.py) -> models/layers.ACTIVATIONS.
# gelu_new, gelu_pytorch_tanh and gelu_fast are the same tanh approximation written three ways.
_ACTIVATIONS = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                'gelu_fast': 'gelu_tanh', 'gelu': 'gelu'}
_GENLAB_TO_HF_ACTIVATION = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu'}

# GPT2Config flags genlab's GPT does not implement: they must keep these values.
_REQUIRED = {'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
             'add_cross_attention': False, 'tie_word_embeddings': True}

# Buffers (not weights) that older GPT-2 files hold: the causal mask and its fill value.
_BUFFER = re.compile(r'h\.\d+\.attn\.(masked_)?bias$')

# Per block: genlab path suffix -> GPT-2 name suffix (weights are [in, out] on both sides).
_BLOCK = {'ln1/scale': 'ln_1.weight', 'ln1/bias': 'ln_1.bias',
          'attn/qkv/kernel': 'attn.c_attn.weight', 'attn/qkv/bias': 'attn.c_attn.bias',
          'attn/proj/kernel': 'attn.c_proj.weight', 'attn/proj/bias': 'attn.c_proj.bias',
          'ln2/scale': 'ln_2.weight', 'ln2/bias': 'ln_2.bias',
          'mlp/fc/kernel': 'mlp.c_fc.weight', 'mlp/fc/bias': 'mlp.c_fc.bias',
          'mlp/proj/kernel': 'mlp.c_proj.weight', 'mlp/proj/bias': 'mlp.c_proj.bias'}
_TOP = {'wte/embedding': 'wte.weight', 'wpe/embedding': 'wpe.weight',
        'ln_f/scale': 'ln_f.weight', 'ln_f/bias': 'ln_f.bias'}


def check_dir(hf_dir: str) -> None:
  """UserError naming the first of config.json, model.safetensors, tokenizer.json missing."""
  if not os.path.isdir(hf_dir):
    raise UserError(f'--hf_dir={hf_dir}: not a directory')
  for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
    if not os.path.isfile(os.path.join(hf_dir, name)):
      extra = (' (sharded checkpoints, model.safetensors.index.json, are not supported)'
               if name == WEIGHTS_FILE else '')
      raise UserError(f'--hf_dir={hf_dir}: no {name} there; a Hugging Face GPT-2 directory '
                      f'holds {CONFIG_FILE}, {WEIGHTS_FILE} and {TOKENIZER_FILE}{extra}')


def read_config(hf_dir: str) -> dict[str, Any]:
  """config.json of `hf_dir`; UserError when unreadable."""
  path = os.path.join(hf_dir, CONFIG_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path}: cannot read it ({e})') from None
  if not isinstance(config, dict):
    raise UserError(f'{path}: not a JSON object')
  return config


def model_settings(hf_config: dict[str, Any], path: str) -> dict[str, Any]:
  """genlab's config.model keys for a GPT2Config dict; UserError for what genlab lacks.

  `path` names config.json in the messages.
  """
  if hf_config.get('model_type') != 'gpt2':
    raise UserError(f'{path}: model_type {hf_config.get("model_type")!r}: only gpt2 '
                    'checkpoints can be imported')
  for key in ('n_embd', 'n_head', 'n_layer', 'n_positions', 'vocab_size'):
    if not isinstance(hf_config.get(key), int) or hf_config[key] < 1:
      raise UserError(f'{path}: {key}={hf_config.get(key)!r}: must be a positive int')
  for key, value in _REQUIRED.items():
    if hf_config.get(key, value) != value:
      raise UserError(f'{path}: {key}={hf_config[key]!r}: genlab\'s GPT implements only '
                      f'{key}={json.dumps(value)}')
  embed, heads = hf_config['n_embd'], hf_config['n_head']
  if embed % heads:
    raise UserError(f'{path}: n_embd={embed} is not divisible by n_head={heads}')
  if hf_config.get('n_inner') not in (None, 4 * embed):
    raise UserError(f'{path}: n_inner={hf_config["n_inner"]}: genlab\'s GPT has an MLP of '
                    f'4 * n_embd = {4 * embed}')
  activation = hf_config.get('activation_function', 'gelu_new')
  if activation not in _ACTIVATIONS:
    raise UserError(f'{path}: activation_function={activation!r}: genlab implements '
                    f'{", ".join(_ACTIVATIONS)}')
  if abs(float(hf_config.get('layer_norm_epsilon', 1e-5)) - 1e-5) > 1e-12:
    raise UserError(f'{path}: layer_norm_epsilon={hf_config["layer_norm_epsilon"]}: genlab\'s '
                    'LayerNorms use 1e-5')
  return dict(block_size=hf_config['n_positions'], num_layers=hf_config['n_layer'],
              num_heads=heads, embed_dim=embed, vocab_size=hf_config['vocab_size'],
              activation=_ACTIVATIONS[activation],
              init_std=float(hf_config.get('initializer_range', 0.02)))


def hf_config(model: dict[str, Any], *, bos_id: int | None, eos_id: int | None
              ) -> dict[str, Any]:
  """A GPT2Config dict (config.json) for genlab's config.model keys."""
  return {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
      'vocab_size': model['vocab_size'], 'n_positions': model['block_size'],
      'n_embd': model['embed_dim'], 'n_layer': model['num_layers'], 'n_head': model['num_heads'],
      'n_inner': None, 'activation_function': _GENLAB_TO_HF_ACTIVATION[model['activation']],
      'resid_pdrop': model['dropout'], 'embd_pdrop': model['dropout'],
      'attn_pdrop': model['dropout'], 'layer_norm_epsilon': 1e-5,
      'initializer_range': model.get('init_std') or model['embed_dim'] ** -0.5,
      'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
      'reorder_and_upcast_attn': False, 'add_cross_attention': False,
      'tie_word_embeddings': True, 'use_cache': True, 'bos_token_id': bos_id,
      'eos_token_id': eos_id, 'dtype': 'float32'}


# ------------------------------------------------------------------------------- weights


def _qkv_to_genlab(x: np.ndarray, heads: int) -> np.ndarray:
  """c_attn weight `[D, 3D]` or bias `[3D]`, columns `[3, heads, head_dim]` -> `[heads, 3,
  head_dim]`."""
  lead = x.shape[:-1]
  return x.reshape(lead + (3, heads, -1)).swapaxes(-3, -2).reshape(x.shape)


def _qkv_to_hf(x: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of `_qkv_to_genlab`."""
  lead = x.shape[:-1]
  return x.reshape(lead + (heads, 3, -1)).swapaxes(-3, -2).reshape(x.shape)


def _names(num_layers: int) -> dict[str, str]:
  """genlab param path -> GPT-2 name (without the `transformer.` prefix)."""
  names = dict(_TOP)
  for i in range(num_layers):
    names.update({f'blocks/{i}/{k}': f'h.{i}.{v}' for k, v in _BLOCK.items()})
  return names


def to_genlab(tensors: dict[str, np.ndarray], model: dict[str, Any], path: str
              ) -> dict[str, np.ndarray]:
  """GPT-2 tensors (a safetensors file's, GPT2Model or GPT2LMHeadModel names) -> genlab param
  path -> float32 array. UserError naming `path` for a missing, extra or misshapen tensor."""
  stripped = {}
  for name, value in tensors.items():
    short = name.removeprefix('transformer.')
    if not _BUFFER.fullmatch(short):
      stripped[short] = value
  lm_head = stripped.pop('lm_head.weight', None)
  names = _names(model['num_layers'])
  missing = sorted(set(names.values()) - set(stripped))
  if missing:
    raise UserError(f'{path}: lacks tensor {missing[0]}' +
                    (f' and {len(missing) - 1} more' if len(missing) > 1 else ''))
  extra = sorted(set(stripped) - set(names.values()))
  if extra:
    raise UserError(f'{path}: tensor {extra[0]} is not part of a GPT-2 of {model["num_layers"]} '
                    'layers (genlab imports GPT2Model / GPT2LMHeadModel weights only)')
  if lm_head is not None and not np.array_equal(lm_head, stripped['wte.weight']):
    raise UserError(f'{path}: lm_head.weight differs from wte.weight: genlab\'s GPT ties them')
  d, v = model['embed_dim'], model['vocab_size']
  shapes = {'wte/embedding': (v, d), 'wpe/embedding': (model['block_size'], d),
            'attn/qkv/kernel': (d, 3 * d), 'attn/qkv/bias': (3 * d,),
            'attn/proj/kernel': (d, d), 'mlp/fc/kernel': (d, 4 * d), 'mlp/fc/bias': (4 * d,),
            'mlp/proj/kernel': (4 * d, d)}
  params = {}
  for ours, theirs in names.items():
    x = np.asarray(stripped[theirs])
    suffix = ours.split('/', 2)[-1] if ours.startswith('blocks/') else ours
    want = shapes.get(suffix, (d,))
    if x.shape != want:
      raise UserError(f'{path}: tensor {theirs} has shape {list(x.shape)}, config.json implies '
                      f'{list(want)}')
    x = x.astype(np.float32)
    if suffix.startswith('attn/qkv/'):
      x = _qkv_to_genlab(x, model['num_heads'])
    params[ours] = x
  return params


def to_hf(params: dict[str, np.ndarray], model: dict[str, Any]) -> dict[str, np.ndarray]:
  """genlab param path -> array, to GPT2LMHeadModel's tensor names (as its `save_pretrained`
  writes them: `transformer.` prefix, the tied lm_head left out)."""
  out = {}
  for ours, theirs in _names(model['num_layers']).items():
    x = np.asarray(params[ours])
    if '/qkv/' in ours:
      x = _qkv_to_hf(x, model['num_heads'])
    out[f'transformer.{theirs}'] = np.ascontiguousarray(x)
  return out
