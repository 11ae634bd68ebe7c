"""The one train loop shared by every model family.

Reading order: mesh -> family and data -> state shapes and shardings -> jitted init or restore
-> jitted, donated train step -> loop (log, eval, checkpoint, samples) -> final checkpoint.
A family (train/family.py) plugs in its networks, data, loss and sampling; nothing here knows
which family runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import families
from train import metrics as metrics_lib
from train import optim
from train import sharding as sharding_lib
from train.errors import UserError
from train.family import Family, StepContext


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is left untouched."""


@dataclasses.dataclass
class TrainResult:
  state: Any                      # final train state (sharded jax arrays)
  history: list[dict[str, float]]  # every logged row (train and eval), as in metrics.jsonl
  step_losses: dict[int, float]    # the train loss of every step this run executed


# ---------------------------------------------------------------------------------------------
# Validation (before anything is compiled).
# ---------------------------------------------------------------------------------------------
def validate(config: ml_collections.ConfigDict) -> None:
  for key in ('total_steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every'):
    value = config[key]
    if not isinstance(value, int) or value < (1 if key in ('batch_size', 'log_every') else 0):
      raise UserError(f'config.{key}={value!r}: must be a '
                      f'{"positive" if key in ("batch_size", "log_every") else "non-negative"} int')
  if not 0.0 <= config.get('ema_decay', 0.0) < 1.0:
    raise UserError(f'config.ema_decay={config.ema_decay}: must be in [0, 1)')


def prepare_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir}: exists and is not a directory')
  try:
    os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
  except OSError as e:
    raise UserError(f'--workdir={workdir}: cannot create it ({e.strerror})') from None


# ---------------------------------------------------------------------------------------------
# Train state: shapes first, then shardings, then a jitted init that creates it sharded.
# ---------------------------------------------------------------------------------------------
class StateBuilder:
  """Builds the train state of a family; shared by training, sampling and evaluation."""

  def __init__(self, family: Family, config: ml_collections.ConfigDict):
    self.family = family
    self.ema_decay = float(config.get('ema_decay', 0.0))
    self.optimizers = family.optimizers(optim.make_optimizer)
    self.graphdefs: dict[str, Any] = {}
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    self.abstract = jax.eval_shape(self._init, init_key)
    self.init_key = init_key

  def _init(self, key: jax.Array) -> dict[str, Any]:
    models = self.family.make_models(nnx.Rngs(key))
    params, rest = {}, {}
    for name, model in models.items():
      self.graphdefs[name], params[name], rest[name] = nnx.split(model, nnx.Param, ...)
    for name in self.optimizers:
      if name not in params:
        raise UserError(f'family {self.family.name!r}: optimizer for unknown network {name!r}')
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'rest': rest,
             'opt': {n: tx.init(params[n]) for n, tx in self.optimizers.items()}}
    if self.ema_decay > 0:
      state['ema'] = {n: params[n] for n in self.optimizers}
    return state

  def init(self, shardings) -> dict[str, Any]:
    return jax.jit(self._init, out_shardings=shardings)(self.init_key)

  def models(self, params, rest) -> dict[str, nnx.Module]:
    return {n: nnx.merge(gd, params[n], rest[n]) for n, gd in self.graphdefs.items()}

  def sampling_params(self, state) -> dict[str, Any]:
    """EMA params where the run kept them, else the trained params."""
    return {**state['params'], **state.get('ema', {})}


def num_params(abstract_params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))


# ---------------------------------------------------------------------------------------------
# The jitted steps.
# ---------------------------------------------------------------------------------------------
def make_train_step(builder: StateBuilder, config, mesh):
  family = builder.family
  step_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  micro_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES))

  def train_step(state, batch):
    # Randomness is a pure function of (seed, step): a resumed run draws exactly what an
    # uninterrupted one would, with no RNG state to checkpoint.
    rng = jax.random.fold_in(step_key, state['step'])
    ctx = StepContext(builder.graphdefs, state, builder.optimizers,
                      accum_steps=int(config.get('grad_accum_steps', 1)),
                      ema_decay=builder.ema_decay,
                      micro_batch_constraint=lambda x: jax.lax.with_sharding_constraint(
                          x, micro_sharding))
    metrics = family.train_step(ctx, batch, rng)
    new_state = dict(ctx.state, step=state['step'] + 1)
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

  return train_step


def make_eval_step(builder: StateBuilder):
  def eval_step(params, rest, batch):
    return builder.family.eval_step(builder.models(params, rest), batch)
  return jax.jit(eval_step)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
class _Preemption:
  """Turns SIGTERM into a flag the loop checks each step (then it checkpoints and exits)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  validate(config)
  prepare_workdir(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding_lib.make_mesh(config, devices)
  sharding_lib.check_batch(config, mesh)
  family = families.get(config.family)(config)
  family.setup_data(jax.process_index(), jax.process_count())

  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config_lib.to_json(config))
    with open(os.path.join(workdir, 'family.json'), 'w', encoding='utf-8') as f:
      json.dump(family.metadata(), f)

  builder = StateBuilder(family, config)
  shardings = sharding_lib.state_shardings(builder.abstract, mesh)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                       keep=int(config.get('keep_checkpoints', 3)))
  latest = checkpointer.latest_step()
  if latest is None:
    state = builder.init(shardings)
  else:
    state, meta = checkpointer.restore(
        latest, ckpt_lib.abstract_with_shardings(builder.abstract, shardings))
    metrics_lib.print_line(f'Resumed from {checkpointer.directory}/{latest} '
                           f'(data position: step {meta["data_step"]})')
  start = int(jax.device_get(state['step']))
  total = int(config.total_steps)

  n_params = num_params(builder.abstract['params'])
  metrics_lib.print_line(
      f'{family.name}: {n_params:,} params | mesh {dict(mesh.shape)} | batch {config.batch_size}'
      f' | steps {start}->{total}')

  train_step = jax.jit(make_train_step(builder, config, mesh),
                       in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                       out_shardings=(shardings, sharding_lib.replicated(mesh)),
                       donate_argnums=0)
  eval_step = make_eval_step(builder)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  history: list[dict[str, float]] = []
  step_losses: dict[int, float] = {}

  def log(step, scalars):
    history.append({'step': step, **scalars})
    writer.write(step, scalars)

  def evaluate(step):
    scalars = {}
    variants = [('eval', state['params'])]
    if 'ema' in state:
      variants.append(('eval_ema', builder.sampling_params(state)))
    for prefix, params in variants:
      sums, count = {}, 0
      for batch in family.eval_batches():
        m = jax.device_get(eval_step(params, state['rest'], sharding_lib.put_batch(batch, mesh)))
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
        count += 1
      means = family.derived_eval_metrics({k: v / count for k, v in sums.items()})
      scalars.update({f'{prefix}/{k}': v for k, v in means.items()})
    log(step, scalars)
    metrics_lib.print_line(f'eval @ {step}: ' + ' | '.join(
        f'{k} {v:.4f}' for k, v in sorted(scalars.items())))

  def write_samples(step):
    if is_main:
      models = builder.models(builder.sampling_params(state), state['rest'])
      family.write_samples(models, jax.random.fold_in(jax.random.key(config.seed), 2 + step),
                           os.path.join(workdir, 'samples', f'step_{step:07d}'))

  def save(step):
    checkpointer.save(step, state, {'data_step': step, 'family': family.name})

  if start >= total:
    metrics_lib.print_line(f'Nothing to do: the checkpoint is at step {start} >= total_steps')
    writer.close()
    checkpointer.close()
    return TrainResult(state, history, step_losses)

  # Compile ahead of the first step, so compile time is reported on its own.
  t0 = time.perf_counter()
  first_batch = sharding_lib.put_batch(family.train_batch(start), mesh)
  compiled = train_step.lower(state, first_batch).compile()
  compile_s = time.perf_counter() - t0
  flops = family.flops_per_step(builder.abstract['params'])
  if flops is None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', 0.0)) * mesh.size if cost else 0.0
  peak = metrics_lib.matmul_peak_flops(list(mesh.devices.flat)) if flops else 0.0
  metrics_lib.print_line(
      f'compiled train step in {compile_s:.1f}s | {flops / 1e9:.3f} GFLOP/step | '
      f'measured matmul peak {peak / 1e9:.1f} GFLOP/s over {mesh.size} device(s)')
  log(start, {'compile_time_s': compile_s})

  schedule = optim.make_schedule(config.optimizer) if 'optimizer' in config else None
  pending: list[tuple[int, dict]] = []
  interval = {'sums': {}, 'steps': 0}
  t_interval = time.perf_counter()

  def flush():
    """Fetches pending step metrics; stops the run on a non-finite loss."""
    nonlocal pending
    for s, m in jax.device_get(pending):
      loss = float(m['loss'])
      if not math.isfinite(loss):
        raise NonFiniteLossError(
            f'loss is {loss} at step {s + 1}; stopped without checkpointing it (the last good '
            f'checkpoint is step {checkpointer.latest_step()})')
      step_losses[s + 1] = loss
      interval['sums'] = {k: interval['sums'].get(k, 0.0) + float(v) for k, v in m.items()}
      interval['steps'] += 1
    pending = []

  step = start
  batch = first_batch
  try:
    with _Preemption() as preemption:
      while step < total:
        state, m = compiled(state, batch)
        pending.append((step, m))
        step += 1
        if step < total:
          batch = sharding_lib.put_batch(family.train_batch(step), mesh)  # overlaps the step
        is_log = step % config.log_every == 0 or step == total
        is_eval = config.eval_every and (step % config.eval_every == 0 or step == total)
        is_ckpt = config.checkpoint_every and step % config.checkpoint_every == 0
        is_sample = config.get('sample_every', 0) and step % config.sample_every == 0
        # A device sync at least every 16 steps: many queued collectives on fake CPU devices
        # time out (TECH.md), and losses are checked before any checkpoint is written.
        if is_log or is_eval or is_ckpt or is_sample or preemption.requested or len(pending) >= 16:
          flush()
        if is_log and interval['steps']:
          dt = (time.perf_counter() - t_interval) / interval['steps']
          scalars = {k: v / interval['steps'] for k, v in interval['sums'].items()}
          scalars.update({'step_time_ms': 1e3 * dt,
                          f'{family.unit}_per_s': family.items_per_step() / dt,
                          **({'lr': float(schedule(step - 1))} if schedule else {})})
          if flops and peak:
            scalars['mfu'] = flops / dt / peak
          log(step, scalars)
          metrics_lib.print_line(metrics_lib.progress_line(step, total, scalars, unit=family.unit))
          interval = {'sums': {}, 'steps': 0}
        if is_eval or is_ckpt or is_sample:
          if is_eval:
            evaluate(step)
          if is_sample:
            write_samples(step)
          if is_ckpt:
            save(step)
          interval = {'sums': {}, 'steps': 0}
          t_interval = time.perf_counter()
        elif is_log:
          t_interval = time.perf_counter()
        if preemption.requested:
          metrics_lib.print_line(f'SIGTERM: checkpointing step {step} and exiting')
          break
    flush()
    save(step)  # the final checkpoint (on completion and on SIGTERM)
    if step == total:
      write_samples(step)
  finally:
    # On any error (a non-finite loss included) only finish saves already started: never
    # write the current, possibly bad, state.
    checkpointer.close()
    writer.close()
  return TrainResult(state, history, step_losses)
