"""Experiment configs: Python files with `get_config(arg)`, plus type-checked overrides.

`--config=experiments/configs/gpt_shakespeare.py:tiny --config.model.dropout=0.1` loads the file,
calls `get_config('tiny')`, then applies each override. Overrides must name an existing key
and give a value of that key's type (an int where an int is, `true`/`false` for a bool, any text
for a str); anything else is a `UserError` naming the key. ml_collections' own `config_flags`
answers the same mistakes with a traceback, hence this small parser.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from train.errors import UserError

_PREFIX = '--config.'


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` and returns its locked config."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'--config: no config file at {path!r}')
  module_spec = importlib.util.spec_from_file_location(
      f'genlab_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'--config: {path} does not load: {type(e).__name__}: {e}') from e
  if not hasattr(module, 'get_config'):
    raise UserError(f'--config: {path} has no get_config(arg) function')
  try:
    config = module.get_config(arg or None)
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'--config: {path} rejects argument {arg!r}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'--config: {path}: get_config({arg or None!r}) returned a '
                    f'{type(config).__name__}, not an ml_collections.ConfigDict')
  config.lock()
  return config


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.KEY=VALUE` arguments from the rest of argv."""
  rest, overrides = [], []
  for a in argv:
    if a.startswith(_PREFIX):
      key, eq, value = a[len(_PREFIX):].partition('=')
      if not eq:
        raise UserError(f'{a}: write config overrides as --config.KEY=VALUE')
      overrides.append((key, value))
    else:
      rest.append(a)
  return rest, overrides


def _field_type(config: ml_collections.ConfigDict, key: str) -> type | None:
  """The declared type of a leaf (placeholders included), or None for untyped leaves."""
  parent, _, leaf = key.rpartition('.')
  node = config
  for part in filter(None, parent.split('.')):
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise KeyError(key)
  ref = node.get_ref(leaf)
  return ref.get_type()


def _current(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _parse(text: str, kind: type | None) -> Any:
  if kind is str:
    return text
  lowered = text.lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  if lowered in ('none', 'null'):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word: the type check below decides


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]
                    ) -> ml_collections.ConfigDict:
  """Applies `(dotted key, text)` overrides with type checks; returns the config."""
  for key, text in overrides:
    try:
      kind = _field_type(config, key)
    except (KeyError, AttributeError):
      raise UserError(f'--config.{key}: unknown config key') from None
    if kind is ml_collections.ConfigDict:
      raise UserError(f'--config.{key}: is a group; override its keys, e.g. --config.{key}.NAME=...')
    value = _parse(text, kind)
    if value is None and kind is not None and _current(config, key) is not None:
      # ml_collections would take None for any typed field; only optional keys (those whose
      # value is None, e.g. placeholders) may be unset.
      raise UserError(f'--config.{key}={text}: expected {kind.__name__}; this key cannot be '
                      'none')
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if (kind is int and isinstance(value, bool)) or (
        kind is not None and value is not None and not isinstance(value, kind)):
      raise UserError(f'--config.{key}={text}: expected {kind.__name__}, '
                      f'got {type(value).__name__}')
    try:
      config.update_from_flattened_dict({key: value})
    except (TypeError, KeyError, AttributeError) as e:
      raise UserError(f'--config.{key}={text}: {e}') from None
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def flatten(config) -> dict[str, Any]:
  """{'model.num_heads': 4, ...}: dotted keys to JSON values (tuples become lists)."""
  out = {}
  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        out[f'{prefix}{key}'] = value
  walk(json.loads(json.dumps(config.to_dict() if hasattr(config, 'to_dict') else config)), '')
  return out


def from_json(text: str) -> ml_collections.ConfigDict:
  """The resolved config saved in a workdir; placeholders come back as plain (None) values."""
  return config_dict.ConfigDict(json.loads(text))
