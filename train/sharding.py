"""Device mesh from the config, parameter sharding rules, and batch shardings.

Parallelism is one `jax.jit` over a `Mesh` with named axes ('data', 'fsdp', 'tensor'); the
strategies differ only in `PartitionSpec`s, and XLA inserts the collectives:
  * data parallel (`mesh.data`): the batch is split, params are replicated;
  * FSDP (`mesh.fsdp`): every state array's largest free dimension divisible by the fsdp size
    is split over it (big_vision's `fsdp` rule), so params, optimizer state and EMA take 1/N
    per device; the batch is split over it too;
  * tensor parallel (`mesh.tensor`): `config.sharding.rules` split chosen dimensions of chosen
    params over 'tensor' (for a transformer: attention heads and the MLP hidden layer).
The batch is always split over ('data', 'fsdp') together, and replicated over 'tensor'.

Rules: `config.sharding.rules` is a sequence of `(regex, spec)`; `regex` is `re.search`ed in
the '/'-joined path of each state leaf (e.g. 'params/model/blocks/0/attn/qkv/kernel', and
the same suffix under 'opt/...' and 'ema/...', so optimizer moments and EMA follow their
params); `spec` names a mesh axis (or None) per dimension. The first matching rule wins; the
FSDP rule then shards one of the dimensions the rule left free. Model code carries no
sharding annotations.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train.errors import UserError

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


# ---------------------------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------------------------
def mesh_sizes(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Axis sizes of `config.mesh` for `num_devices` (one axis may be -1: the rest)."""
  for key in config.mesh:
    if key not in AXES:
      raise UserError(f'--config.mesh.{key}: unknown mesh axis (known: {", ".join(AXES)})')
  sizes = {axis: int(config.mesh.get(axis, 1)) for axis in AXES}
  if list(sizes.values()).count(-1) > 1:
    raise UserError(f'config.mesh: at most one axis may be -1, got {sizes}')
  known = math.prod(s for s in sizes.values() if s != -1)
  if any(s == 0 or s < -1 for s in sizes.values()) or (-1 in sizes.values()
                                                        and num_devices % known):
    raise UserError(f'config.mesh {sizes} does not fit {num_devices} devices')
  sizes = {a: num_devices // known if s == -1 else s for a, s in sizes.items()}
  if math.prod(sizes.values()) != num_devices:
    raise UserError(f'config.mesh {sizes} needs {math.prod(sizes.values())} devices, '
                    f'but {num_devices} are available')
  return sizes


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A mesh sized by `config.mesh` over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(config, len(devices))
  # create_device_mesh orders devices for the physical topology (TPU torus, hosts): devices
  # of one process end up contiguous, so each process holds a contiguous block of the batch.
  # On CPU and single GPU hosts it is the plain order.
  device_grid = mesh_utils.create_device_mesh(list(sizes.values()), devices)
  return Mesh(device_grid, AXES)


def describe_mesh(mesh: Mesh) -> str:
  sizes = ', '.join(f'{a}={n}' for a, n in mesh.shape.items())
  return (f'mesh ({sizes}) over {mesh.size} {mesh.devices.flat[0].platform} device(s) in '
          f'{len({d.process_index for d in mesh.devices.flat})} process(es)')


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_batch_share(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """(index, count): this process feeds rows [index * B/count, (index+1) * B/count).

  Usually (process_index, process_count); fewer when an axis that replicates the batch (e.g.
  'tensor') spans processes, in which case those processes read the same rows.
  """
  sharding = batch_sharding(mesh)
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(global_batch)[index[0]])
  if not rows:
    return 0, 1  # abstract devices (compile-ahead for a TPU topology): no data is read
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo or global_batch % (hi - lo) or lo % (hi - lo):
    raise UserError(f'mesh {dict(mesh.shape)}: process {jax.process_index()} holds batch rows '
                    f'that are not one contiguous share; order config.mesh so that processes '
                    f'split the data axes')
  return lo // (hi - lo), global_batch // (hi - lo)


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Fails early (before compiling) when the batch cannot be split as asked."""
  batch, accum = int(config.batch_size), int(config.get('grad_accum_steps', 1))
  n = data_parallel_size(mesh)
  if accum < 1 or batch % accum:
    raise UserError(f'config.batch_size={batch} is not divisible by '
                    f'config.grad_accum_steps={accum}')
  if (batch // accum) % n:
    raise UserError(f'config.batch_size={batch} (micro-batch {batch // accum}) is not divisible '
                    f'by the {n} data-parallel devices (mesh {dict(mesh.shape)})')


# ---------------------------------------------------------------------------------------------
# Parameter rules.
# ---------------------------------------------------------------------------------------------
def leaf_path(path) -> str:
  """'params/model/blocks/0/attn/qkv/kernel' for a state leaf's key path."""
  text = jax.tree_util.keystr(path, simple=True, separator='/')
  return text[:-len('/value')] if text.endswith('/value') else text  # nnx.Variable's value


def parse_rules(config: ml_collections.ConfigDict, mesh_shape: dict[str, int]
                ) -> list[tuple[re.Pattern, tuple[Any, ...]]]:
  """`config.sharding.rules` compiled and checked against the mesh axes."""
  sharding = config.get('sharding') or {}
  raw = sharding.get('rules') or ()
  rules = []
  for i, rule in enumerate(raw):
    where = f'config.sharding.rules[{i}]={tuple(rule) if isinstance(rule, list) else rule!r}'
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], (tuple, list))):
      raise UserError(f'{where}: write a rule as (regex, (axis or None, ...))')
    try:
      pattern = re.compile(rule[0])
    except re.error as e:
      raise UserError(f'{where}: bad regex ({e})') from None
    spec = tuple(tuple(a) if isinstance(a, list) else a for a in rule[1])
    for entry in spec:
      for axis in (entry if isinstance(entry, tuple) else (entry,)):
        if axis is not None and axis not in mesh_shape:
          raise UserError(f'{where}: unknown mesh axis {axis!r} (known: {", ".join(AXES)})')
    rules.append((pattern, spec))
  for axis, key in (sharding.get('divides') or ()):
    value, size = config, mesh_shape.get(axis)
    try:
      for part in key.split('.'):
        value = value[part]
    except (KeyError, AttributeError, TypeError):
      raise UserError(f'config.sharding.divides: ({axis!r}, {key!r}) names config.{key}, '
                      'which does not exist') from None
    if not isinstance(value, int) or isinstance(value, bool):
      raise UserError(f'config.sharding.divides: ({axis!r}, {key!r}) names config.{key}='
                      f'{value!r}, not an int')
    if size is None:
      raise UserError(f'config.sharding.divides: unknown mesh axis {axis!r}')
    if value % size:
      raise UserError(f'config.mesh.{axis}={size} does not divide config.{key}={value} '
                      f'(the sharding rules split it over {axis!r})')
  return rules


def _axis_size(entry, mesh_shape) -> int:
  axes = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh_shape[a] for a in axes if a is not None)


def _drop_unit_axes(entry, mesh_shape):
  axes = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,))
               if a is not None and mesh_shape[a] > 1)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def leaf_spec(path: str, shape: Sequence[int], rules, mesh_shape: dict[str, int]) -> P:
  """The first matching rule's spec, then FSDP on the largest free divisible dimension."""
  spec: list[Any] = [None] * len(shape)
  for pattern, rule_spec in rules:
    if pattern.search(path):
      if len(rule_spec) != len(shape):
        raise UserError(f'sharding rule {pattern.pattern!r} gives {len(rule_spec)} axes to '
                        f'{path} of shape {list(shape)}')
      for dim, entry in enumerate(rule_spec):
        size = _axis_size(entry, mesh_shape)
        if shape[dim] % size:
          raise UserError(f'sharding rule {pattern.pattern!r} splits dim {dim} of {path} '
                          f'{list(shape)} over {entry}={size}, which does not divide '
                          f'{shape[dim]}')
      # Axes of size 1 shard nothing: drop them, so that with tensor=1 the FSDP rule below
      # sees the same free dimensions as without rules.
      spec = [_drop_unit_axes(e, mesh_shape) for e in rule_spec]
      break
  fsdp = mesh_shape.get('fsdp', 1)
  used = {a for e in spec for a in (e if isinstance(e, tuple) else (e,))}
  if fsdp > 1 and 'fsdp' not in used:
    # A free dimension first; else split a rule's dimension further (e.g. a bias over
    # ('tensor', 'fsdp')), so that every large enough array is sharded over fsdp.
    by_size = sorted(range(len(shape)), key=lambda d: (spec[d] is not None, -shape[d], -d))
    for dim in by_size:
      size = _axis_size(spec[dim], mesh_shape) * fsdp
      if shape[dim] % size == 0 and shape[dim] >= size:
        entry = spec[dim]
        spec[dim] = 'fsdp' if entry is None else (
            (*entry, 'fsdp') if isinstance(entry, tuple) else (entry, 'fsdp'))
        break
  while spec and spec[-1] is None:  # P(None, None) means P(); say it the short way
    spec.pop()
  return P(*spec)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Shards the largest dimension divisible by `fsdp_size`; replicates small or odd arrays."""
  return leaf_spec('', shape, [], {'fsdp': fsdp_size})


def state_shardings(abstract_state: Any, mesh: Mesh, rules=()) -> Any:
  """NamedShardings for every leaf of the train state (params, optimizer state, EMA, step).

  Rules match on the path suffix and FSDP depends only on the shape, so Adam's moments and the
  EMA get exactly the sharding of the params they mirror.
  """
  shape = dict(mesh.shape)
  paths = [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_state)[0]]
  for i, (pattern, _) in enumerate(rules):
    if not any(pattern.search(p) for p in paths):
      # A typo would otherwise leave the tensor it meant replicated, silently.
      example = next((p for p in paths if p.startswith('params/')), paths[0] if paths else '')
      raise UserError(f'config.sharding.rules[{i}]: {pattern.pattern!r} matches no parameter '
                      f'(paths look like {example!r})')
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, leaf_spec(leaf_path(p), x.shape, rules, shape)),
      abstract_state)


def without_axis(shardings: Any, axis: str) -> Any:
  """The same shardings with `axis` removed (replicated over it)."""
  def drop(s):
    spec = [_drop_unit_axes(tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a != axis),
                            {**s.mesh.shape, axis: 1}) for e in s.spec]
    return NamedSharding(s.mesh, P(*spec))
  return jax.tree.map(drop, shardings, is_leaf=lambda t: isinstance(t, NamedSharding))


def sharding_table(abstract_params: Any, shardings: Any) -> list[str]:
  """One line per parameter group (layer indices folded into '*'): shape, spec, per device."""
  groups: dict[str, list] = collections.OrderedDict()
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  for (path, x), s in zip(flat, jax.tree.leaves(
      shardings, is_leaf=lambda t: isinstance(t, NamedSharding))):
    name = re.sub(r'/\d+(?=/|$)', '/*', leaf_path(path))
    groups.setdefault(name, [0, x.shape, s])[0] += 1
  width = max([len(n) for n in groups] + [5])
  lines = [f'  {"param":<{width}}  {"shape":<16} {"sharding":<28} per device']
  for name, (count, shape, s) in groups.items():
    spec = str(tuple(s.spec)) if any(e is not None for e in s.spec) else 'replicated'
    local = list(s.shard_shape(shape))
    lines.append(f'  {name:<{width}}  {str(list(shape)):<16} {spec:<28} {local}'
                 + (f'  x{count}' if count > 1 else ''))
  return lines


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds of a sharded tree (the largest shard, for uneven splits)."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      shardings, is_leaf=lambda t: isinstance(t, NamedSharding))):
    total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------
def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, share_count: int | None = None
              ) -> dict[str, jax.Array]:
  """Assembles each process's share of the batch into global arrays sharded over the batch axes.

  `share_count` is the number of distinct shares (see `process_batch_share`); default: one per
  process. Every process passes its rows in the same device order: the mesh's.
  """
  sharding = batch_sharding(mesh)
  count = share_count or jax.process_count()

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * count,) + x.shape[1:])

  return jax.tree.map(put, local_batch)
