"""Device mesh from the config, and shardings for the train state and batches.

Parallelism is one `jax.jit` over a `Mesh` whose named axes are ('data', 'fsdp'); strategies
differ only in `PartitionSpec`s:
  * data parallel (`mesh.data=-1`): params and optimizer state replicated, batch split over devices;
  * FSDP (`mesh.fsdp=-1`): every array's largest dimension divisible by the fsdp axis is split
    over it (big_vision's `fsdp` rule), so params, optimizer state and EMA take 1/N per device;
    XLA inserts the all-gathers and reduce-scatters;
  * both (`mesh.data=2, mesh.fsdp=4`): FSDP inside groups, data parallel across them.
The batch is always split over ('data', 'fsdp') together.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train.errors import UserError

AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A mesh sized by `config.mesh` (one axis may be -1: the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  for key in config.mesh:
    if key not in AXES:
      raise UserError(f'--config.mesh.{key}: unknown mesh axis (known: {", ".join(AXES)})')
  sizes = [int(config.mesh.get(axis, 1)) for axis in AXES]
  if sizes.count(-1) > 1:
    raise UserError(f'config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or (-1 in sizes and len(devices) % known):
    raise UserError(f'config.mesh {dict(zip(AXES, sizes))} does not fit {len(devices)} devices')
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise UserError(f'config.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, '
                    f'but {len(devices)} are available')
  # create_device_mesh orders devices for the physical topology (TPU torus, hosts); on CPU
  # and single GPU hosts it is the plain order.
  device_grid = mesh_utils.create_device_mesh(sizes, devices)
  return Mesh(device_grid, AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


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
  if batch % jax.process_count():
    raise UserError(f'config.batch_size={batch} is not divisible by the '
                    f'{jax.process_count()} processes')


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Shards the largest dimension divisible by `fsdp_size`; replicates small or odd arrays."""
  if fsdp_size == 1 or not shape:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], -d)):
    if shape[dim] % fsdp_size == 0 and shape[dim] >= fsdp_size:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of the train state (params, optimizer state, EMA, step).

  The rule depends only on a leaf's shape, so Adam's moments and the EMA get exactly the
  sharding of the params they mirror.
  """
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's share of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
