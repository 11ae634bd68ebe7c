r"""The loop's own cost: the steps/s `python -m train` logs against the jitted step timed alone.

For each config, in one process, interleaved window by window (so a shared machine slows both
sides alike):
  * loop: `train.loop.train` from scratch in a fresh temporary workdir for --gpt_steps or
    --ddpm_steps steps, with the config's eval, checkpoint and sample cadence scaled to the
    shorter run (below). Its speed is what it logs: each log_every-step window's step_time_ms,
    every window after the first (which holds the first step's one-off work). The eval,
    checkpoint and sample pauses themselves are not in the logged windows (the loop restarts its
    clock after them), but any work they leave running in the background is, and so is all the
    loop does per step (fetching and placing the next batch, metrics, syncs);
  * step: the same config's jitted train step as the loop runs it (train.loop's `TrainStep`,
    over the state's leaves; compiled once) on as many steps, on 20 real batches placed on the
    device beforehand, dispatched in chunks of 20 with a sync after each (the loop syncs at
    least every 16 steps), with Python's garbage collector as in a plain script (the loop keeps
    it off its steps). It runs right after each logged window, where the loop computes its
    progress line, outside the loop's timed windows (this script wraps
    `train.metrics.progress_line` to get there);
and prints, per round, the ratio of the loop's steps/s to the step's over all those windows;
then the median of the rounds.

Cadence: each of eval_every, checkpoint_every and sample_every is divided by
config.total_steps / steps and rounded down to a multiple of log_every (GPT: 2000 -> 1000
steps, log every 100: eval every 500 -> 200, checkpoint every 1000 -> 500; DDPM: 3600 -> 100
steps, log every 10: eval and checkpoint every 1000 -> 20, samples every 500 -> 10), so the short
run pauses at least as often per step as the full one (DDPM: before every window), and
eval_batches is scaled alike where that keeps at least one batch (GPT: 50 -> 25). --pauses
keeps only some of them (e.g. checkpoint), or none before the end (none).

  TFDS_DATA_DIR=... python -m experiments.benchmark_loop [--only=gpt,ddpm] [--rounds=3] \
      [--pauses=eval,checkpoint,sample|none]

--dispatch_rounds=N measures something else instead: the host's cost of calling the step. The
config's step jitted over the state as a pytree of nnx Variables (`loop.jit_train_step`) and
over its leaves (`loop.TrainStep`, what the loop calls), alternating chunks of 20 steps for N
rounds: ms per step, and the host thread's CPU time per call (dispatching the 20 calls, before
the sync), medians over the rounds.

  TFDS_DATA_DIR=... python -m experiments.benchmark_loop --dispatch_rounds=7
"""

from __future__ import annotations

import gc
import math
import shutil
import statistics
import tempfile
import time
from typing import Any

import jax
from absl import app, flags, logging

from experiments.configs import ddpm_mnist, gpt_shakespeare
from train import cli
from train import loop
from train import metrics as metrics_lib
from train import sharding as sharding_lib

_ONLY = flags.DEFINE_list('only', ['gpt', 'ddpm'], 'Configs to measure: gpt, ddpm.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds (loop runs) per config.')
_GPT_STEPS = flags.DEFINE_integer('gpt_steps', 1000, 'Loop steps per GPT round.')
_DDPM_STEPS = flags.DEFINE_integer('ddpm_steps', 100, 'Loop steps per DDPM round.')
_PAUSES = flags.DEFINE_list('pauses', ['eval', 'checkpoint', 'sample'],
                            'Pauses kept at the scaled cadence (eval, checkpoint, sample; none: '
                            'none before the end): what each costs, by difference.')
_DISPATCH_ROUNDS = flags.DEFINE_integer(
    'dispatch_rounds', 0, 'Instead of the loop: time the step called over the state as a pytree '
    'of Variables and over its leaves, alternating, this many rounds.')
_PAUSE_KEYS = {'eval': 'eval_every', 'checkpoint': 'checkpoint_every', 'sample': 'sample_every'}
_CHUNK = 20

CONFIGS = {'gpt': (lambda: gpt_shakespeare.get_config(), _GPT_STEPS, 100),
           'ddpm': (lambda: ddpm_mnist.get_config(), _DDPM_STEPS, 10)}


def scaled_config(name: str):
  make, steps_flag, log_every = CONFIGS[name]
  config = make()
  steps = steps_flag.value
  factor = config.total_steps / steps
  config.total_steps = steps
  config.log_every = log_every
  unknown = set(_PAUSES.value) - set(_PAUSE_KEYS) - {'none'}
  if unknown:
    raise app.UsageError(f'--pauses: unknown {sorted(unknown)} (use {", ".join(_PAUSE_KEYS)} '
                         'or none)')
  for pause, key in _PAUSE_KEYS.items():
    if config.get(key, 0):  # rounded down to a multiple of log_every: pauses fall on log steps
      config[key] = (max(log_every, int(config[key] / factor) // log_every * log_every)
                     if pause in _PAUSES.value else 0)
  config.eval_batches = max(1, round(config.eval_batches / factor))
  return config


class IsolatedStep:
  """The config's jitted train step, compiled once, timed on batches placed beforehand."""

  def __init__(self, config):
    s = loop.setup(config)
    state = s.builder.init(s.shardings)
    step = loop.TrainStep(s.builder, config, s.mesh, s.shardings)
    self.batches = [sharding_lib.put_batch(s.family.train_batch(i), s.mesh)
                    for i in range(_CHUNK)]
    self.compiled = step.lower(state, self.batches[0]).compile()
    self.state, m = self.compiled(step.flatten(state), self.batches[0])  # warm-up (leaves)
    jax.block_until_ready(m)

  def seconds(self, steps: int) -> float:
    """Seconds for `steps` steps (in chunks of _CHUNK; rounded up to whole chunks, then scaled),
    with Python's garbage collector as in a plain script (on, nothing frozen), whatever the
    loop around this call set."""
    chunks = max(1, math.ceil(steps / _CHUNK))
    enabled, frozen = gc.isenabled(), gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.enable()
    try:
      t = time.perf_counter()
      for _ in range(chunks):
        for b in self.batches:
          self.state, m = self.compiled(self.state, b)
        jax.block_until_ready(m)
      return (time.perf_counter() - t) * steps / (chunks * _CHUNK)
    finally:
      if frozen:
        gc.freeze()
      if not enabled:
        gc.disable()


def dispatch_rows(name: str, rounds: int) -> list[str]:
  """The config's step over the state as a pytree and over its leaves, alternating chunks of
  _CHUNK steps: ms per step and the host thread's CPU ms per call, medians of `rounds`."""
  config = CONFIGS[name][0]()
  s = loop.setup(config)
  batches = [sharding_lib.put_batch(s.family.train_batch(i), s.mesh) for i in range(_CHUNK)]
  flat = loop.TrainStep(s.builder, config, s.mesh, s.shardings)
  tree = loop.jit_train_step(s.builder, config, s.mesh, s.shardings)
  state = s.builder.init(s.shardings)
  # name: [compiled step, its state (each side its own: the steps donate it)]
  sides = {'pytree of Variables (jit_train_step)':
               [tree.lower(state, batches[0]).compile(), state],
           'leaves (TrainStep, the loop)':
               [flat.lower(state, batches[0]).compile(),
                flat.flatten(s.builder.init(s.shardings))]}
  times = {k: [] for k in sides}
  for r in range(rounds + 1):   # round 0 warms up
    for k, side in sides.items():
      compiled = side[0]
      wall, cpu = time.perf_counter(), time.thread_time()
      for b in batches:
        side[1], m = compiled(side[1], b)
      host = time.thread_time() - cpu
      jax.block_until_ready(m)
      if r:
        times[k].append(((time.perf_counter() - wall) / _CHUNK, host / _CHUNK))
  return [f'{name} ({flat.treedef.num_leaves} state leaves), step over the {k}: '
          f'{1e3 * statistics.median(w for w, _ in v):.2f} ms/step, host CPU '
          f'{1e3 * statistics.median(h for _, h in v):.3f} ms per call (rounds: '
          + ', '.join(f'{1e3 * w:.1f}/{1e3 * h:.2f}' for w, h in v) + ')'
          for k, v in times.items()]


def time_loop(config, isolated: IsolatedStep) -> dict[str, Any]:
  """Trains `config` from scratch; after each logged window, `isolated` on as many steps."""
  out = {'loop_s': [], 'step_s': [], 'steps': []}
  progress_line = metrics_lib.progress_line
  last = [None]

  def progress_line_then_step(step, total, scalars, **kwargs):
    if last[0] is not None:  # the first window holds the first step's one-off work
      n = step - last[0]
      out['steps'].append(n)
      out['loop_s'].append(n * scalars['step_time_ms'] / 1e3)
      out['step_s'].append(isolated.seconds(n))
    last[0] = step
    return progress_line(step, total, scalars, **kwargs)

  workdir = tempfile.mkdtemp(prefix='genlab-benchmark-loop-')
  metrics_lib.progress_line = progress_line_then_step
  try:
    t0 = time.perf_counter()
    loop.train(config, workdir)
    out['wall_s'] = time.perf_counter() - t0
  finally:
    metrics_lib.progress_line = progress_line
    shutil.rmtree(workdir, ignore_errors=True)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # as the train command: no Orbax INFO lines
  family = next((line.split(':')[1].strip() for line in open('/proc/cpuinfo')
                 if line.startswith('cpu family')), '?')
  lines = []
  for name in _ONLY.value if _DISPATCH_ROUNDS.value else ():
    for line in dispatch_rows(name, _DISPATCH_ROUNDS.value):
      print(line, flush=True)
      lines.append(line)
  for name in () if _DISPATCH_ROUNDS.value else _ONLY.value:
    config = scaled_config(name)
    isolated = IsolatedStep(config)
    ratios = []
    for r in range(_ROUNDS.value):
      t = time_loop(config, isolated)
      steps = sum(t['steps'])
      loop_ms, step_ms = 1e3 * sum(t['loop_s']) / steps, 1e3 * sum(t['step_s']) / steps
      ratios.append(step_ms / loop_ms)
      windows = ' '.join(f'{1e3 * a / n:.0f}/{1e3 * b / n:.0f}'
                         for a, b, n in zip(t['loop_s'], t['step_s'], t['steps']))
      line = (f'{name} round {r + 1}: loop {loop_ms:.1f} ms/step (logged, {steps} steps) | '
              f'step alone {step_ms:.1f} ms/step | loop speed / step speed {ratios[-1]:.3f} | '
              f'run wall {t["wall_s"]:.0f}s | loop/step ms per window: {windows}')
      print(line, flush=True)
      lines.append(line)
    lines.append(f'{name}: median loop speed / step speed {statistics.median(ratios):.3f} over '
                 f'{len(ratios)} rounds ({", ".join(f"{x:.3f}" for x in ratios)}); total_steps='
                 f'{config.total_steps} log_every={config.log_every} eval_every='
                 f'{config.eval_every} eval_batches={config.eval_batches} checkpoint_every='
                 f'{config.checkpoint_every} sample_every={config.get("sample_every", 0)}')
  print(f'\nhost: cpu family {family}, {jax.device_count()} device(s), load average '
        f'{" ".join(open("/proc/loadavg").read().split()[:3])}')
  for line in lines:
    print(line)


if __name__ == '__main__':
  cli.tune_host()  # as the train command does
  app.run(main)
