"""Metrics out of the loop: metrics.jsonl, TensorBoard events, progress lines, MFU.

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


class Progress:
  """Progress of a long host-side loop over `total` items (sampling, featurising, likelihoods):
  a line after each chunk, at most one every `every_s` seconds (the first and last always), with
  items/s, elapsed time and an ETA. The first chunk usually includes compilation: its line says
  so, and once a second chunk is done the rate and ETA come from the chunks after it.

    progress = Progress('sampling', 10_000)   # prints 'sampling: 10,000 images'
    for ...: progress.update(len(chunk))
    # 'sampling 500/10,000 images | 3.3 images/s | elapsed 2m30s | ETA 47m30s | first chunk:
    #  includes compilation, if any', then e.g. 'sampling 1,000/10,000 images | 4.1 images/s | ...'
  """

  def __init__(self, what: str, total: int, *, unit: str = 'images', every_s: float = 10.0,
               note: str = '', printer=print_line, clock=time.perf_counter):
    self.what, self.total, self.unit, self.every_s = what, int(total), unit, every_s
    self._print, self._clock = printer, clock
    self.done, self._first = 0, None   # (items, time) after the first chunk
    self._start = self._last_print = clock()
    self._print(f'{what}: {self.total:,} {unit}' + (f' ({note})' if note else ''))

  def rate(self) -> float:
    """Items per second, excluding the first chunk once there are more."""
    now = self._clock()
    if self._first is not None and self.done > self._first[0] and now > self._first[1]:
      return (self.done - self._first[0]) / (now - self._first[1])
    return self.done / max(now - self._start, 1e-9)

  def update(self, num: int) -> None:
    self.done += int(num)
    now = self._clock()
    first = self._first is None
    if first:
      self._first = (self.done, now)
    if not (first or self.done >= self.total or now - self._last_print >= self.every_s):
      return
    self._last_print = now
    rate = self.rate()
    eta = (self.total - self.done) / rate if rate > 0 else math.inf
    parts = [f'{self.what} {self.done:,}/{self.total:,} {self.unit}',
             f'{rate:,.1f} {self.unit}/s' if rate < 100 else f'{rate:,.0f} {self.unit}/s',
             f'elapsed {format_duration(now - self._start)}', f'ETA {format_duration(eta)}']
    if first and self.done < self.total:
      parts.append('first chunk: includes compilation, if any')
    self._print(' | '.join(parts))


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
