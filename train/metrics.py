"""Metrics out of the loop: metrics.jsonl, TensorBoard events, a progress line, MFU.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from train import storage


class MetricsWriter:
  """Appends `{"step": s, **scalars}` lines to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self._jsonl = storage.JsonLines(storage.join(workdir, 'metrics.jsonl'))
    # tensorboardX writes event files without TensorFlow (flax.metrics.tensorboard needs TF).
    self._tb = storage.tensorboard_writer(storage.join(workdir, 'tensorboard'))
    # A remote event file is uploaded whole on each flush: keep it current at every log.
    self._flush_tb = not storage.is_local(workdir)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write({'step': int(step), **scalars})
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    if self._flush_tb:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


def progress_line(step: int, total: int, scalars: Mapping[str, float], *, unit: str) -> str:
  """One line: step, losses, ms/step, throughput, MFU, ETA."""
  parts = [f'step {step}/{total}']
  for k in sorted(scalars):
    if k.endswith('loss'):
      parts.append(f'{k} {scalars[k]:.4f}')
  if 'step_time_ms' in scalars:
    parts.append(f'{scalars["step_time_ms"]:.1f} ms/step')
  if f'{unit}_per_s' in scalars:
    parts.append(f'{scalars[f"{unit}_per_s"]:,.0f} {unit}/s')
  if 'mfu' in scalars:
    parts.append(f'MFU {100 * scalars["mfu"]:.1f}%')
  if 'step_time_ms' in scalars:
    parts.append(f'ETA {format_duration((total - step) * scalars["step_time_ms"] / 1e3)}')
  return ' | '.join(parts)


def print_line(line: str) -> None:
  print(line, file=sys.stdout, flush=True)


def matmul_peak_flops(devices=None, dtype=jnp.float32, size: int = 1024, repeats: int = 5) -> float:
  """Measured FLOP/s of a jitted square matmul spread over `devices` (best of `repeats`).

  The MFU denominator is measured rather than looked up: on CPUs, and on shared or throttled
  accelerators, a datasheet peak says little about what this run could reach.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ('d',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d'))
  # [devices, size, size]: one independent matmul per device, no communication.
  a = jax.device_put(jnp.ones((n, size, size), dtype), sharding)
  b = jax.device_put(jnp.ones((n, size, size), dtype), sharding)
  f = jax.jit(lambda a, b: jnp.einsum('nij,njk->nik', a, b))
  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n * size ** 3 / best
