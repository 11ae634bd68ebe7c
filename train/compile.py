"""`python -m train.compile --config=X.py[:ARG] --devices=N [--config.KEY=VALUE ...]`.

Compiles a config's train step for a mesh of N devices without running it and prints the mesh,
each parameter group's sharding and the per-device memory: params, optimizer state and EMA
(exact, from the shardings) and XLA's `memory_analysis()` of the compiled step (arguments,
temporaries, peak). It tells whether a model fits before renting hardware.

Devices: N fake CPU devices (`--xla_force_host_platform_device_count`, set here before JAX is
imported), or with `--topology=v5e:2x4` an abstract TPU topology, compiled by the TPU compiler
itself: that needs libtpu (`pip install 'jax[tpu]'`), not a TPU, and works offline on a CPU
machine. CPU temporaries differ from an accelerator's (other fusions; models that choose their
kernels by backend, like GPT's attention, trace their CPU path here), so treat the CPU figures
as an upper estimate; params and optimizer bytes are exact for any backend.
No training data is read beyond what the family needs to know its shapes (e.g. a vocabulary).
"""

from __future__ import annotations

import os
import re
import sys


def _set_device_count(argv) -> None:
  """--devices=N must reach XLA before JAX is imported."""
  for i, arg in enumerate(argv):
    value = arg.split('=', 1)[1] if arg.startswith('--devices=') else (
        argv[i + 1] if arg == '--devices' and i + 1 < len(argv) else None)
    if value is not None and value.isdigit():
      flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                     os.environ.get('XLA_FLAGS', ''))
      os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={value}'.strip()
      if not any(a.startswith('--topology') for a in argv):
        os.environ.setdefault('JAX_PLATFORMS', 'cpu')


if __name__ == '__main__':
  _set_device_count(sys.argv)

# pylint: disable=wrong-import-position
import time
from typing import Any, Sequence

import jax
import ml_collections
from absl import flags

from train import checkpoint as ckpt_lib
from train import cli
from train import config as config_lib
from train import loop
from train import sharding as sharding_lib
from train.errors import UserError

_CONFIG = flags.DEFINE_string('config', None, 'Config file, path.py[:ARG].')
_DEVICES = flags.DEFINE_integer('devices', None, 'Number of (fake CPU) devices of the mesh.')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'Abstract TPU topology, e.g. v5e:2x2 '
                                '(needs jax[tpu]); replaces --devices.')
_HBM_GIB = flags.DEFINE_float('hbm_gib', None, 'Memory of one device in GiB: say whether the '
                              'step fits.')


def abstract_batch(setup: loop.Setup) -> dict[str, jax.ShapeDtypeStruct]:
  """Global batch shapes from the family's batch at step 0, sharded over the batch axes."""
  sharding = sharding_lib.batch_sharding(setup.mesh)
  return {k: jax.ShapeDtypeStruct((v.shape[0] * setup.share[1],) + v.shape[1:], v.dtype,
                                  sharding=sharding)
          for k, v in setup.family.train_batch(0).items()}


def compile_step(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None
                 ) -> tuple[dict[str, Any], list[str]]:
  """Compiles the train step on `devices` from shapes alone; returns (bytes report, lines)."""
  loop.validate(config)
  setup = loop.setup(config, devices)
  state = ckpt_lib.abstract_with_shardings(setup.builder.abstract, setup.shardings)
  t0 = time.perf_counter()
  step = loop.TrainStep(setup.builder, config, setup.mesh, setup.shardings)   # as the loop
  compiled = step.lower(state, abstract_batch(setup)).compile()
  report, memory_line = loop.memory_report(compiled, setup.builder.abstract, setup.shardings)
  report['compile_s'] = time.perf_counter() - t0
  report['num_params'] = loop.num_params(setup.builder.abstract['params'])
  report['collectives'] = count_collectives(compiled.as_text())
  lines = [f'{setup.family.name}: {report["num_params"]:,} params | batch {config.batch_size}',
           sharding_lib.describe_mesh(setup.mesh),
           *sharding_lib.sharding_table(setup.builder.abstract['params'],
                                        setup.shardings['params']),
           memory_line,
           'collectives in the step: ' + (', '.join(
               f'{op} {n}' for op, n in report['collectives'].items() if n) or 'none'),
           f'compiled in {report["compile_s"]:.1f}s']
  return report, lines


COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')


def count_collectives(hlo_text: str) -> dict[str, int]:
  """How many of each collective the compiled HLO holds (async '-start' halves counted once)."""
  return {op: len(re.findall(rf' {op}(?:-start)?\(', hlo_text)) for op in COLLECTIVES}


def topology_devices(name: str) -> list[Any]:
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return list(topologies.get_topology_desc(name, 'tpu').devices)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f'--topology={name}: this JAX cannot describe TPU topologies ({first}); '
                    f"install 'jax[tpu]' or use --devices=N fake CPU devices") from None


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _CONFIG.value:
    raise UserError('--config is required')
  config = config_lib.apply_overrides(config_lib.load(_CONFIG.value), cli.OVERRIDES)
  if _TOPOLOGY.value:
    devices = topology_devices(_TOPOLOGY.value)
  else:
    if not _DEVICES.value or _DEVICES.value < 1:
      raise UserError('--devices=N (N >= 1) or --topology=NAME is required')
    if jax.device_count() != _DEVICES.value:
      raise UserError(f'--devices={_DEVICES.value}: JAX already has {jax.device_count()} '
                      f'{jax.default_backend()} devices (XLA_FLAGS was set elsewhere?)')
    devices = jax.devices()
  report, lines = compile_step(config, devices)
  for line in lines:
    print(line, flush=True)
  if _HBM_GIB.value:
    need = report.get('peak_bytes', report['params_bytes'] + report.get('opt_bytes', 0))
    verdict = 'fits' if need <= _HBM_GIB.value * 2**30 else 'does NOT fit'
    print(f'{verdict}: ~{need / 2**30:.2f} GiB per device of {_HBM_GIB.value:g} GiB', flush=True)


if __name__ == '__main__':
  cli.run(main, config_overrides=True)
