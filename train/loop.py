"""The one train loop shared by every model family.

Reading order: mesh -> family and data -> state shapes and shardings -> jitted init or restore
-> jitted, donated train step -> loop (log, eval, checkpoint, samples) -> final checkpoint.
A family (train/family.py) plugs in its networks, data, loss and sampling; nothing here knows
which family runs.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from models import rngs as rngs_lib
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import families
from train import metrics as metrics_lib
from train import optim
from train import prune as prune_lib
from train import sharding as sharding_lib
from train import storage
from train import tune
from train import tuned_checkpoint as tuned_ckpt
from train.errors import UserError
from train.family import Family, StepContext


class NonFiniteLossError(RuntimeError):
  """The loss, params or optimizer state became NaN or infinite; the last good checkpoint is
  left untouched."""


# A step metric (1.0 or 0.0): params, optimizer state and EMA all finite after the step.
STATE_FINITE = 'state_finite'


def all_finite(tree) -> jax.Array:
  """1.0 when every float leaf of `tree` is finite, else 0.0 (one fused reduction on device)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all().astype(jnp.float32) if leaves else jnp.float32(1.0)


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
    positive = key in ('total_steps', 'batch_size', 'log_every')
    if not isinstance(value, int) or value < (1 if positive else 0):
      raise UserError(f'config.{key}={value!r}: must be a '
                      f'{"positive" if positive else "non-negative"} int')
  if not 0.0 <= config.get('ema_decay', 0.0) < 1.0:
    raise UserError(f'config.ema_decay={config.ema_decay}: must be in [0, 1)')
  tune.check_quantize(config, training=True)
  profile_window(config)
  prune_lib.Pruning(config)


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """`config.profile_steps` 'START,COUNT' as the step range [START, START + COUNT), or None."""
  text = str(config.get('profile_steps', '') or '').strip()
  if not text:
    return None
  parts = text.split(',')
  try:
    start, count = (int(p) for p in parts)
  except ValueError:
    start = count = -1
  if len(parts) != 2 or start < 0 or count < 1:
    raise UserError(f'config.profile_steps={text!r}: write START,COUNT (START >= 0, COUNT >= 1), '
                    f'e.g. 100,5')
  return start, start + count


def check_workdir(workdir: str) -> None:
  """Before anything is written: a path that is a file, or a directory we cannot write in."""
  if storage.exists(workdir):
    if not storage.isdir(workdir):
      raise UserError(f'--workdir={workdir}: exists and is not a directory')
    storage.check_writable(workdir)


def prepare_workdir(workdir: str) -> None:
  try:
    storage.makedirs(storage.join(workdir, 'samples'))
  except OSError as e:
    raise UserError(f'--workdir={workdir}: cannot create it '
                    f'({getattr(e, "strerror", None) or e})') from None


def check_same_run(workdir: str, config, checkpointer, step: int, abstract_state) -> None:
  """UserError (nothing overwritten) when `workdir`'s checkpoint is of another family or shape."""
  config_path = storage.join(workdir, 'config.json')
  saved = {}
  if storage.exists(config_path):
    try:
      saved = config_lib.flatten(config_lib.from_json(storage.read_text(config_path)))
    except (OSError, ValueError):
      saved = {}  # damaged: the checkpoint's shapes below still tell
  now = config_lib.flatten(config)
  if saved.get('family', config.family) != config.family:
    raise UserError(f'--workdir={workdir}: holds a {saved["family"]!r} run, but '
                    f'config.family={config.family!r}; use another --workdir')
  diffs = checkpointer.shape_differences(step, abstract_state)
  if diffs:
    keys = [f'config.{k}: {saved.get(k)!r} in the run, {now.get(k)!r} now'
            for k in sorted(set(saved) | set(now))
            if not k.startswith(_RUN_CONTROL) and saved.get(k) != now.get(k)]
    raise UserError(f'--workdir={workdir}: checkpoint {step} was written with other shapes ('
                    + '; '.join(keys + diffs) + '); use the run\'s config or another --workdir')


# Config keys that a resumed run may change (they shape no array): left out when naming the
# keys that differ from the run's. (init_from only seeds a run's start; a tuned run's
# checkpoints name their base themselves.)
_RUN_CONTROL = ('total_steps', 'log_every', 'eval_every', 'checkpoint_every', 'sample_every',
                'keep_checkpoints', 'eval_batches', 'sample_count', 'sample_tokens', 'batch_size',
                'grad_accum_steps', 'mesh.', 'sharding.', 'data.data_dir', 'data.raw_dir',
                'optimizer.lr', 'optimizer.min_lr', 'optimizer.warmup_steps',
                'optimizer.decay_steps', 'optimizer.schedule', 'optimizer.grad_clip',
                'init_from')


# ---------------------------------------------------------------------------------------------
# Train state: shapes first, then shardings, then a jitted init that creates it sharded.
# ---------------------------------------------------------------------------------------------
class StateBuilder:
  """Builds the train state of a family; shared by training, sampling and evaluation."""

  def __init__(self, family: Family, config: ml_collections.ConfigDict):
    self.family = family
    self.config = config
    self.ema_decay = float(config.get('ema_decay', 0.0))
    self.trainable = tune.Trainable(config)
    self.pruning = prune_lib.Pruning(config)
    # Pruning wraps outermost: its state (the masks) is then the first level of 'opt'.
    # LoRA+ (config.lora.b_lr_ratio) scales the B matrices' updates of the trained params.
    self.optimizers = {
        n: self.pruning.wrap_optimizer(n, self.trainable.wrap_optimizer(
            n, tune.lora_plus(config, tx)))
        for n, tx in family.optimizers(optim.make_optimizer).items()}
    if tune.post_training_quantized(config):
      # int8 params (python -m train.quantize) are served, not trained: no optimizer state.
      self.optimizers = {n: optax.set_to_zero() for n in self.optimizers}
    self.graphdefs: dict[str, Any] = {}
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    self.abstract = jax.eval_shape(self._init, init_key)
    self.init_key = init_key
    self.trainable.check(self.abstract['params'], self.optimizers)
    self.pruning.check(self.abstract['params'], self.optimizers)

  def _init(self, key: jax.Array) -> dict[str, Any]:
    models = self.family.make_models(rngs_lib.rngs(key))
    # LoRA adapters draw from their own key: the base params are those of a run without them.
    # Only trained networks get them (a frozen teacher or reference stays as its run has it).
    tune.apply_lora({n: m for n, m in models.items() if n in self.optimizers}, self.config,
                    jax.random.fold_in(key, 1))
    # Quantized layers (config.quantize): int8 params, or fake quantization for QAT.
    models = tune.apply_quantization(models, self.config)
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
class _FsdpStepContext(StepContext):
  """FSDP as ZeRO-3: networks are built from params all-gathered over 'fsdp'.

  Without this hint XLA may keep a weight split over 'fsdp' and reshard the activations to
  match it instead (all-to-alls, heads split over the batch devices); with it, each weight is
  gathered where it is used and its gradient reduce-scattered back to the stored sharding.
  """

  def __init__(self, *args, compute_shardings, **kwargs):
    super().__init__(*args, **kwargs)
    self._compute_shardings = compute_shardings

  def models(self, params=None, rest=None):
    params = {**self.state['params'], **(params or {})}
    params = {n: jax.tree.map(jax.lax.with_sharding_constraint, p, self._compute_shardings[n])
              for n, p in params.items()}
    return super().models(params, rest)


def make_train_step(builder: StateBuilder, config, mesh, shardings=None):
  family = builder.family
  gather = shardings is not None and mesh.shape['fsdp'] > 1
  context = functools.partial(
      _FsdpStepContext, compute_shardings=sharding_lib.without_axis(
          shardings['params'], 'fsdp')) if gather else StepContext
  step_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  micro_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES))

  def train_step(state, batch):
    # Randomness is a pure function of (seed, step): a resumed run draws exactly what an
    # uninterrupted one would, with no RNG state to checkpoint.
    rng = jax.random.fold_in(step_key, state['step'])
    ctx = context(builder.graphdefs, state, builder.optimizers,
                      accum_steps=int(config.get('grad_accum_steps', 1)),
                      ema_decay=builder.ema_decay, trainable=builder.trainable,
                      micro_batch_constraint=lambda x: jax.lax.with_sharding_constraint(
                          x, micro_sharding))
    metrics = family.train_step(ctx, batch, rng)
    new_state = dict(ctx.state, step=state['step'] + 1)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    # A NaN can reach the weights while the loss is still finite: the host checks this with
    # the loss when it flushes metrics (before any checkpoint), so it costs no extra sync.
    metrics[STATE_FINITE] = all_finite({k: new_state[k] for k in ('params', 'opt', 'ema')
                                        if k in new_state})
    return new_state, metrics

  return train_step


def jit_train_step(builder: StateBuilder, config, mesh, shardings):
  """The train step jitted over `mesh`: state in `shardings`, batch split, metrics replicated."""
  return jax.jit(make_train_step(builder, config, mesh, shardings),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=0)


class TrainStep:
  """The jitted train step over the state's leaves, as the loop runs it.

  A jitted function called with the state as a pytree of nnx Variables has the host flatten and
  rebuild every Variable in Python on each call, several times the host CPU of a call over a flat
  list of arrays (`python -m experiments.benchmark_loop --dispatch_rounds=7`; the figures are in
  experiments/README.md, "The loop's own cost"). On 2 cores that is time taken from XLA's
  threads; on an accelerator it is latency. This step takes and returns the leaves (`flatten` /
  `unflatten` convert, where the loop pauses).
  """

  def __init__(self, builder: StateBuilder, config, mesh, shardings):
    self.treedef = jax.tree.structure(shardings)
    step = make_train_step(builder, config, mesh, shardings)

    def flat_step(leaves, batch):
      state, metrics = step(self.treedef.unflatten(leaves), batch)
      return self.treedef.flatten_up_to(state), metrics

    leaf_shardings = self.treedef.flatten_up_to(shardings)
    self.jitted = jax.jit(flat_step,
                          in_shardings=(leaf_shardings, sharding_lib.batch_sharding(mesh)),
                          out_shardings=(leaf_shardings, sharding_lib.replicated(mesh)),
                          donate_argnums=0)

  def flatten(self, state) -> list:
    """The state's arrays in the step's order (the state must have the step's structure)."""
    return self.treedef.flatten_up_to(state)

  def unflatten(self, leaves: list):
    """The state (nnx Variables around the same arrays, no copy) from the step's leaves."""
    return self.treedef.unflatten(leaves)

  def lower(self, state, batch):
    """`jax.jit(...).lower` at the state's leaves: `.compile()` gives f(leaves, batch) ->
    (new leaves, metrics)."""
    return self.jitted.lower(self.flatten(state), batch)


def make_eval_step(builder: StateBuilder, mesh):
  def eval_step(params, rest, batch):
    return builder.family.eval_step(builder.models(params, rest), batch)
  # Replicated metrics: every process can read them without a collective.
  return jax.jit(eval_step, out_shardings=sharding_lib.replicated(mesh))


# ---------------------------------------------------------------------------------------------
# Set-up shared by training and compile-ahead (train/compile.py).
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  mesh: jax.sharding.Mesh
  family: Family
  builder: StateBuilder
  shardings: Any        # NamedSharding per state leaf
  share: tuple[int, int]  # (index, count): which share of each global batch this process reads


def setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """Mesh, rules, family with its data, state shapes and shardings; all checks before compiling."""
  mesh = sharding_lib.make_mesh(config, devices)
  rules = sharding_lib.parse_rules(config, dict(mesh.shape))
  sharding_lib.check_batch(config, mesh)
  family = families.get(config.family)(config)
  share = sharding_lib.process_batch_share(mesh, int(config.batch_size))
  if jax.process_count() > 1:
    # Process 0 prepares a missing dataset on first use; the others wait, then read it.
    if jax.process_index() == 0:
      family.setup_data(*share)
    multihost_utils.sync_global_devices('genlab:setup_data')
    if jax.process_index() != 0:
      family.setup_data(*share)
  else:
    family.setup_data(*share)
  builder = StateBuilder(family, config)
  shardings = sharding_lib.state_shardings(builder.abstract, mesh, rules)
  return Setup(mesh, family, builder, shardings, share)


def memory_report(compiled, abstract_state, shardings) -> tuple[dict[str, int], str]:
  """Per-device bytes: state groups from their shardings, and XLA's `memory_analysis()`."""
  report = {f'{k}_bytes': sharding_lib.per_device_bytes(abstract_state[k], shardings[k])
            for k in ('params', 'opt', 'ema') if k in abstract_state}
  stats = compiled.memory_analysis()
  stats = stats[0] if isinstance(stats, (list, tuple)) else stats
  if stats is not None:
    for key in ('argument', 'output', 'alias', 'temp', 'generated_code'):
      report[f'{key}_bytes'] = int(getattr(stats, f'{key}_size_in_bytes', 0))
    # Donated state aliases its output: live at once are arguments, new outputs and temps.
    report['peak_bytes'] = (report['argument_bytes'] + report['output_bytes']
                            - report['alias_bytes'] + report['temp_bytes']
                            + report['generated_code_bytes'])
  mib = lambda b: f'{b / 2**20:,.2f} MiB' if b >= 2**20 else f'{b / 2**10:,.1f} KiB'
  parts = [f'{k[:-6]} {mib(report[k])}' for k in ('params_bytes', 'opt_bytes', 'ema_bytes')
           if k in report]
  if 'peak_bytes' in report:
    parts += [f'XLA: arguments {mib(report["argument_bytes"])}',
              f'temporaries {mib(report["temp_bytes"])}',
              f'peak ~{mib(report["peak_bytes"])}']
  return report, 'per-device memory: ' + ' | '.join(parts)


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


class _StepProfiler:
  """`config.profile_steps`: a jax.profiler trace of the steps in [start, stop) in DIR/profile.

  Steps are dispatched asynchronously: the trace stops only once the window's steps have
  finished, so it holds their device work. jax.profiler writes local files: for a remote run
  directory (gs://) the trace goes to a local temporary directory and is copied over when it
  stops.
  """

  def __init__(self, window: tuple[int, int] | None, workdir: str):
    self.window = window
    self.target = storage.join(workdir, 'profile')
    self._local = None  # where the running trace is written; None: not tracing

  def before_step(self, step: int) -> None:
    if self.window and step == self.window[0]:
      self._local = (self.target if storage.is_local(self.target)
                     else tempfile.mkdtemp(prefix='genlab-profile-'))
      jax.profiler.start_trace(self._local, create_perfetto_trace=True)

  def after_step(self, step: int, state) -> None:
    if self._local is not None and step == self.window[1]:
      jax.block_until_ready(state)
      self.stop()
      metrics_lib.print_line(f'profile of steps {self.window[0]}-{step - 1} written to '
                             f'{self.target} (tensorboard --logdir, or ui.perfetto.dev)')

  def stop(self) -> None:
    local, self._local = self._local, None
    if local is None:
      return
    jax.profiler.stop_trace()
    if local != self.target:
      storage.copy_tree(local, self.target)
      shutil.rmtree(local, ignore_errors=True)


class _QuietGc:
  """Keeps Python's cyclic garbage collector off the training steps.

  A training process holds ~200k Python objects (JAX, Orbax, TFDS); an automatic full
  collection scans them all and stops the host for 0.3-0.4 s on a 2-core Zen 4 host, and the
  object churn of evals and checkpoints sets one off every few hundred steps, in the middle of
  the steps after them; between those, a young collection runs nearly every step. So, while
  the loop runs, the objects alive at its start are frozen (`gc.freeze`: not scanned until the
  loop ends), automatic collection is off, and the loop collects at its host syncs: the young
  generations (the objects of the last <= 16 steps) while the newest step runs, and everything
  not frozen at logs and pauses. Reference cycles are still freed, at moments of our choosing.
  The collector's previous state is restored on exit.
  """

  def __enter__(self):
    self._was_enabled = gc.isenabled()
    self._was_frozen = gc.get_freeze_count() > 0
    gc.collect(1)  # the young garbage (of compiling, say); a full collection costs ~0.4 s
    gc.freeze()
    gc.disable()
    return self

  @staticmethod
  def collect(young_only: bool) -> None:
    gc.collect(1 if young_only else 2)

  def __exit__(self, *exc):
    if not self._was_frozen:
      gc.unfreeze()
    if self._was_enabled:
      gc.enable()
    return False


@functools.lru_cache(maxsize=None)
def _matmul_peak(devices: tuple[jax.Device, ...]) -> float:
  """Measured once per process and device set (it takes seconds on a CPU)."""
  return metrics_lib.matmul_peak_flops(list(devices))


def log_checkpoint_size(checkpointer, step: int, builder: StateBuilder, log,
                        frozen_from: str | None) -> None:
  """Prints and logs checkpoint `step`'s bytes on disk and the optimizer state's bytes: what a
  fine-tuning method costs to keep (`frozen_from`: a tuned run's base)."""
  try:
    sizes = {'checkpoint_bytes': checkpointer.step_bytes(step),
             'opt_state_bytes': ckpt_lib.array_bytes(builder.abstract['opt'])}
  except OSError as e:  # a listing that failed must not fail a finished run
    metrics_lib.print_line(f'checkpoint {step}: size not measured ({type(e).__name__}: {e})')
    return
  log(step, sizes)
  metrics_lib.print_line(
      f'checkpoint {step}: {sizes["checkpoint_bytes"]:,} bytes on disk'
      + (f' (trained params only; the frozen ones are in {frozen_from})' if frozen_from else '')
      + f' | optimizer state {sizes["opt_state_bytes"]:,} bytes')


def _describe_sparsity(builder: StateBuilder, state) -> str:
  reached = builder.pruning.sparsity_reached(state['params'], builder.optimizers)
  return (f'sparsity {reached["sparsity"]:.4f} ({reached["pruned_weights"]:,} of '
          f'{reached["prunable_weights"]:,} weights selected by config.prune.params are 0)')


def _any_process(flag: bool) -> bool:
  return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  validate(config)
  check_workdir(workdir)
  is_main = jax.process_index() == 0
  multi_process = jax.process_count() > 1
  s = setup(config, devices)  # every config check: nothing is written before they pass
  mesh, family, builder, shardings = s.mesh, s.family, s.builder, s.shardings
  put_batch = lambda batch: sharding_lib.put_batch(batch, mesh, s.share[1])

  prepare_workdir(workdir)
  checkpointer = ckpt_lib.Checkpointer(storage.join(workdir, 'checkpoints'),
                                       keep=int(config.get('keep_checkpoints', 3)))
  latest = checkpointer.latest_step()
  init_from = str(config.get('init_from', '') or '')
  networks_from = {}  # {network: ['DIR:STEP', its name there]}: Family.networks_from_runs
  if latest is None:
    state = builder.init(shardings)
    if init_from:
      state, resolved, fresh = tune.load_init(init_from, state, shardings, family.metadata())
      config = config.copy_and_resolve_references()
      config.init_from = resolved  # config.json records the base run's step
      metrics_lib.print_line(f'Initialised from {resolved}' + (
          f' ({len(fresh)} arrays new in this model keep their init, e.g. {fresh[0]})'
          if fresh else ''))
    if family.networks_from_runs():
      state, networks_from = tune.load_networks(family.networks_from_runs(), state, shardings,
                                                family.metadata())
      for network, (resolved, source) in networks_from.items():
        metrics_lib.print_line(f'Network {network!r} (frozen) from {resolved} (its {source!r})')
    if builder.pruning.enabled:
      # Masks from the weights the run starts from (init_from's), fixed from here on.
      state = builder.pruning.start(state, builder.optimizers, shardings)
      metrics_lib.print_line(f'Pruned ({config.prune.method}): '
                             + _describe_sparsity(builder, state))
  else:
    check_same_run(workdir, config, checkpointer, latest, tuned_ckpt.saved_abstract(
        checkpointer, latest, builder.abstract, builder.trainable))
    state, meta = tuned_ckpt.restore(checkpointer, latest, builder, shardings, family.metadata())
    networks_from = meta.get(tune.NETWORKS_FROM) or {}
    if meta.get(tune.FROZEN_FROM):
      # The run's base is the one its checkpoints name, whatever init_from says now.
      config = config.copy_and_resolve_references()
      config.init_from = meta[tune.FROZEN_FROM]
    metrics_lib.print_line(f'Resumed from {checkpointer.directory}/{latest} '
                           f'(data position: step {meta["data_step"]})')
  # A tuned run (init_from and trainable not 'all') checkpoints what it trains, naming its base.
  trained_only = tuned_ckpt.stores_trained_only(builder.trainable,
                                                str(config.get('init_from', '') or ''))
  if is_main:
    # Only now (a new run, or a restore that worked): a failed restart overwrites nothing.
    storage.write_text(storage.join(workdir, 'config.json'), config_lib.to_json(config))
    storage.write_text(storage.join(workdir, 'family.json'), json.dumps(family.metadata()))
    family.write_run_files(workdir)
  start = int(jax.device_get(state['step']))
  total = int(config.total_steps)

  n_params = num_params(builder.abstract['params'])
  metrics_lib.print_line(
      f'{family.name}: {n_params:,} params'
      + ('' if builder.trainable.everything else
         f' ({builder.trainable.count(builder.abstract["params"]):,} trained: '
         f'config.trainable={builder.trainable.spec!r})')
      + f' | mesh {dict(mesh.shape)} | batch {config.batch_size}'
      f' | steps {start}->{total}')

  train_step = TrainStep(builder, config, mesh, shardings)
  eval_step = make_eval_step(builder, mesh)
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
        m = jax.device_get(eval_step(params, state['rest'], put_batch(batch)))
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
        count += 1
      means = family.derived_eval_metrics({k: v / count for k, v in sums.items()})
      scalars.update({f'{prefix}/{k}': v for k, v in means.items()})
    if builder.pruning.enabled:  # what pruning reached, beside the quality it kept
      scalars['eval/sparsity'] = builder.pruning.sparsity_reached(
          state['params'], builder.optimizers)['sparsity']
    log(step, scalars)
    metrics_lib.print_line(f'eval @ {step}: ' + ' | '.join(
        f'{k} {v:.4f}' for k, v in sorted(scalars.items())))

  def write_samples(step):
    params, rest = builder.sampling_params(state), state['rest']
    if multi_process:
      # Process 0 samples alone, so it must not touch arrays that span other processes:
      # every process takes part in gathering the weights to the host first.
      params, rest = multihost_utils.process_allgather((params, rest), tiled=True)
    if is_main:
      family.write_samples(builder.models(params, rest),
                           jax.random.fold_in(jax.random.key(config.seed), 2 + step),
                           storage.join(workdir, 'samples', f'step_{step:07d}'))

  def save(step):
    meta = {'data_step': step, 'family': family.name}
    if networks_from:
      meta[tune.NETWORKS_FROM] = networks_from
    if trained_only:
      checkpointer.save(step, tuned_ckpt.pack(state, builder.trainable),
                        {**meta, tune.FROZEN_FROM: config.init_from})
    else:
      checkpointer.save(step, state, meta)

  if start >= total:
    metrics_lib.print_line(f'Nothing to do: the checkpoint is at step {start} >= total_steps')
    writer.close()
    checkpointer.close()
    return TrainResult(state, history, step_losses)

  # Compile ahead of the first step, so compile time is reported on its own.
  t0 = time.perf_counter()
  first_batch = put_batch(family.train_batch(start))
  compiled = train_step.lower(state, first_batch).compile()
  compile_s = time.perf_counter() - t0
  if is_main:
    metrics_lib.print_line(sharding_lib.describe_mesh(mesh))
    for line in sharding_lib.sharding_table(builder.abstract['params'], shardings['params']):
      metrics_lib.print_line(line)
    metrics_lib.print_line(memory_report(compiled, builder.abstract, shardings)[1])
  flops = family.flops_per_step(builder.abstract['params'])
  if flops is None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', 0.0)) * mesh.size if cost else 0.0
  # Each process measures its own devices (a measurement must not need a collective).
  local = tuple(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  peak = _matmul_peak(local) * mesh.size / len(local) if flops else 0.0
  metrics_lib.print_line(
      f'compiled train step in {compile_s:.1f}s | {flops / 1e9:.3f} GFLOP/step | '
      f'measured matmul peak {peak / 1e9:.1f} GFLOP/s over {mesh.size} device(s)')
  log(start, {'compile_time_s': compile_s})

  schedule = optim.make_schedule(config.optimizer) if 'optimizer' in config else None
  pending: list[tuple[int, dict]] = []
  interval = {'sums': {}, 'steps': 0}
  t_interval = time.perf_counter()

  def flush(keep_newest: bool = False):
    """Fetches pending step metrics; stops the run on a non-finite loss or state.

    keep_newest: leave the newest step pending (still running), so that the device does not
    idle while the host reads the others and dispatches the next step.
    """
    nonlocal pending
    ready, pending = (pending[:-1], pending[-1:]) if keep_newest else (pending, [])
    for s, m in jax.device_get(ready):
      loss = float(m['loss'])
      finite_state = float(m.pop(STATE_FINITE, 1.0)) == 1.0
      if not math.isfinite(loss) or not finite_state:
        what = (f'loss is {loss}' if not math.isfinite(loss) else
                f'params or optimizer state became non-finite (loss {loss:.4g})')
        raise NonFiniteLossError(
            f'{what} at step {s + 1}; stopped without checkpointing it (the last good '
            f'checkpoint is step {checkpointer.latest_step()})')
      step_losses[s + 1] = loss
      interval['sums'] = {k: interval['sums'].get(k, 0.0) + float(v) for k, v in m.items()}
      interval['steps'] += 1

  step = start
  batch = first_batch
  leaves = train_step.flatten(state)   # what the steps take and return; `state` at pauses
  profiler = _StepProfiler(profile_window(config), workdir)
  try:
    with _Preemption() as preemption, _QuietGc() as quiet_gc:
      while step < total:
        profiler.before_step(step)
        leaves, m = compiled(leaves, batch)
        pending.append((step, m))
        step += 1
        profiler.after_step(step, leaves)
        if step < total:
          batch = put_batch(family.train_batch(step))  # overlaps the step
        is_log = step % config.log_every == 0 or step == total
        is_eval = config.eval_every and (step % config.eval_every == 0 or step == total)
        is_ckpt = config.checkpoint_every and step % config.checkpoint_every == 0
        is_sample = config.get('sample_every', 0) and step % config.sample_every == 0
        # A device sync at least every 16 steps: dispatching ~50 steps with collectives on fake
        # CPU devices without waiting aborts in a 40 s all-reduce rendezvous timeout on a
        # 2-core machine; and losses are checked before any checkpoint is written.
        full_sync = bool(is_log or is_eval or is_ckpt or is_sample)
        sync = full_sync or len(pending) >= 16
        if multi_process:
          # SIGTERM may reach some processes only: all agree at the same (deterministic)
          # steps, or one would leave the loop while the others wait in a collective.
          stop = sync and _any_process(preemption.requested)
        else:
          stop = preemption.requested
        if sync or stop:
          # Between logs and pauses, the newest step keeps the device busy meanwhile.
          flush(keep_newest=not (full_sync or stop))
          quiet_gc.collect(young_only=not (full_sync or stop))
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
          state = train_step.unflatten(leaves)
          if is_eval:
            evaluate(step)
          if is_sample:
            write_samples(step)
          if is_ckpt:
            save(step)
          quiet_gc.collect(young_only=False)  # what the pause left
          interval = {'sums': {}, 'steps': 0}
          t_interval = time.perf_counter()
        elif is_log:
          t_interval = time.perf_counter()
        if stop:
          metrics_lib.print_line(f'SIGTERM: checkpointing step {step} and exiting')
          break
    state = train_step.unflatten(leaves)
    flush()
    save(step)  # the final checkpoint (on completion and on SIGTERM)
    if step == total:
      write_samples(step)
    checkpointer.wait()
    if is_main:
      log_checkpoint_size(checkpointer, step, builder, log,
                          config.init_from if trained_only else None)
    if builder.pruning.enabled:
      metrics_lib.print_line(f'step {step}: ' + _describe_sparsity(builder, state))
  finally:
    profiler.stop()  # when the run ended (or failed) inside the profile window
    # On any error (a non-finite loss included) only finish saves already started: never
    # write the current, possibly bad, state.
    checkpointer.close()
    writer.close()
  return TrainResult(state, history, step_losses)
