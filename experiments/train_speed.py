"""The loop's jitted train step, timed alone: ms/step, items/s and MFU for any config.

Used by experiments/benchmark_translate.py and experiments/compare_transformers.py. FLOPs come
from XLA's cost analysis of the compiled step (padding slots included, so MFU counts them as
work), against a jitted f32 matmul peak measured just before on the same devices. Items are
what the family's `items_per_step` counts (tokens for the transformer families).
"""

from __future__ import annotations

import statistics
import time

import jax

from train import loop
from train import metrics as metrics_lib
from train import sharding as sharding_lib


def matmul_peak(devices, repeats: int = 3) -> float:
  """The best of `repeats` measurements of the jitted f32 matmul peak (FLOP/s): on a shared
  machine a single one can catch another job's burst."""
  devices = list(devices)
  return max(metrics_lib.matmul_peak_flops(devices) for _ in range(repeats))


def measure(config, *, steps: int = 5, chunks: int = 3, peak: float | None = None
            ) -> dict[str, float]:
  """Median over `chunks` timed runs of `steps` train steps on real batches (after a warm-up).

  peak: the FLOP/s that MFU divides by (default: `matmul_peak` measured here, just before).
  Returns ms_per_step, items_per_s, gflops_per_step, peak_gflops, mfu, compile_s, params.
  """
  setup = loop.setup(config)
  state = setup.builder.init(setup.shardings)
  step = loop.TrainStep(setup.builder, config, setup.mesh, setup.shardings)
  batches = [sharding_lib.put_batch(setup.family.train_batch(i), setup.mesh)
             for i in range(steps)]
  t = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  if peak is None:
    peak = matmul_peak(setup.mesh.devices.flat)
  state, m = compiled(step.flatten(state), batches[0])  # warm-up; the state's leaves from here
  jax.block_until_ready(m)
  times = []
  for _ in range(chunks):
    t = time.perf_counter()
    for b in batches:
      state, m = compiled(state, b)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / steps)
  dt = statistics.median(times)
  params = sum(x.size for x in jax.tree.leaves(step.unflatten(state)['params']))
  return {'compile_s': compile_s, 'ms_per_step': 1e3 * dt,
          'items_per_s': setup.family.items_per_step() / dt, 'gflops_per_step': flops / 1e9,
          'peak_gflops': peak / 1e9, 'mfu': flops / dt / peak, 'params': params}
