"""The plug-in protocol every model family implements, and the context its train step runs in.

A family supplies its networks, its data, its loss and its sampling; the loop (train/loop.py) owns
everything else: mesh and shardings, optimizers' state, EMA, the jitted step, gradient
accumulation, checkpoints, metrics. A family whose step updates several networks with several
optimizers (a GAN: discriminator then generator) overrides `train_step` and calls
`ctx.value_and_grad` / `ctx.apply_gradients` once per network, all inside the ONE jitted step.

State layout (a plain pytree, checkpointed as is):
  {'step': int32 [],
   'params': {name: nnx.State of nnx.Param},        # trainable weights per network
   'rest':   {name: nnx.State of other variables},  # e.g. BatchNorm statistics (often empty)
   'opt':    {name: optax state},                   # one optimizer per trained network (of
                                                    # the trained params only: train/tune.py)
   'ema':    {name: nnx.State of nnx.Param}}        # only when config.ema_decay > 0
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from models import layers
from train import tune
from train.errors import UserError

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
# loss_fn(models, batch, rng) -> (scalar loss, metrics); models maps a network's name to its module.
LossFn = Callable[[dict[str, nnx.Module], Batch, jax.Array], tuple[jax.Array, Metrics]]


class StepContext:
  """What a family's `train_step` sees while the loop traces its jitted step.

  It holds the traced state and updates it in place (at trace time), so a family writes an
  ordinary imperative step and the loop returns every mutated piece (params, rest, optimizer
  state, EMA) from the jitted function.
  """

  def __init__(self, graphdefs, state, optimizers: Mapping[str, optax.GradientTransformation],
               *, accum_steps: int, ema_decay: float, micro_batch_constraint=None,
               trainable=None):
    """trainable: a `train.tune.Trainable` (None: every param trains)."""
    self._graphdefs = graphdefs
    self.state = dict(state)
    self.state['params'] = dict(state['params'])
    self.state['rest'] = dict(state['rest'])
    self.state['opt'] = dict(state['opt'])
    if 'ema' in state:
      self.state['ema'] = dict(state['ema'])
    self._optimizers = optimizers
    self._accum_steps = accum_steps
    self._ema_decay = ema_decay
    self._constrain = micro_batch_constraint or (lambda x: x)
    self._trainable = trainable

  def _mask(self, name: str, params) -> list[bool] | None:
    """Per leaf of `params`: trains (True) or frozen; None when all train."""
    if self._trainable is None or self._trainable.everything:
      return None
    return self._trainable.mask(name, params)

  @property
  def step(self) -> jax.Array:
    return self.state['step']

  def models(self, params: Mapping[str, Any] | None = None,
             rest: Mapping[str, Any] | None = None) -> dict[str, nnx.Module]:
    """Modules built from the current state, with `params`/`rest` overriding some networks."""
    params = {**self.state['params'], **(params or {})}
    rest = {**self.state['rest'], **(rest or {})}
    return {name: nnx.merge(gd, params[name], rest[name]) for name, gd in self._graphdefs.items()}

  def value_and_grad(self, loss_fn: LossFn, wrt: str, batch: Batch, rng: jax.Array
                     ) -> tuple[jax.Array, Metrics, Any]:
    """Loss, metrics and gradients of `loss_fn` with respect to network `wrt`'s params.

    With `accum_steps` > 1 the batch is split into micro-batches that are scanned over,
    summing gradients, so peak activation memory is that of one micro-batch. Loss, metrics and
    gradients are means over the whole batch, as if it had been processed in one go. Non-param
    state (e.g. BatchNorm statistics) mutated by the forward pass is carried from micro-batch to
    micro-batch and stored back. With `config.trainable` freezing some params, only the trained
    ones are differentiated; the returned gradients hold zeros in the frozen places.
    """
    n = self._accum_steps
    params, rest = self.state['params'][wrt], self.state['rest'][wrt]
    mask = self._mask(wrt, params)
    if mask is None:
      trained, rebuild = params, lambda p: p
    else:
      # Gradients of the trained leaves only: frozen params are constants of the loss, so no
      # weight gradient is computed (or accumulated) for them.
      trained, rebuild = tune.split_trained(params, mask)

    def micro_loss(p, rest, micro, key):
      models = self.models({wrt: rebuild(p)}, {wrt: rest})
      loss, metrics = loss_fn(models, micro, key)
      new_rest = nnx.state(models[wrt], nnx.Not(nnx.Param))
      return loss, (metrics, new_rest)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if n == 1:
      (loss, (metrics, rest)), grads = grad_fn(trained, rest, batch, rng)
    else:
      # Micro-batch i takes rows i, i+n, i+2n, ...: with the batch sharded contiguously over
      # devices, every micro-batch then stays evenly sharded (a plain reshape to [n, B/n] would
      # put each micro-batch on a subset of the devices).
      def split(x):
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        return self._constrain(x)
      micro_batches = jax.tree.map(split, batch)

      def body(carry, xs):
        grads_sum, loss_sum, metrics_sum, rest = carry
        micro, i = xs
        (loss, (metrics, rest)), grads = grad_fn(trained, rest, micro, jax.random.fold_in(rng, i))
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (add(grads_sum, grads), loss_sum + loss, add(metrics_sum, metrics), rest), None

      zeros_like = lambda t: jax.tree.map(jnp.zeros_like, t)
      first = jax.tree.map(lambda x: x[0], micro_batches)
      metrics_shape = jax.eval_shape(lambda: micro_loss(trained, rest, first, rng)[1][0])
      init = (zeros_like(trained), jnp.zeros((), jnp.float32),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape), rest)
      (grads, loss, metrics, rest), _ = jax.lax.scan(
          body, init, (micro_batches, jnp.arange(n)))
      grads = jax.tree.map(lambda g: g / n, grads)
      loss = loss / n
      metrics = jax.tree.map(lambda m: m / n, metrics)
    if mask is not None:
      # The params' tree for the optimizer: zeros in the frozen places, which its
      # `optax.set_to_zero` branch ignores (XLA drops them).
      frozen_zeros = jax.tree.map(jnp.zeros_like, params)
      grads = tune.split_trained(frozen_zeros, mask)[1](grads)
    self.state['rest'][wrt] = rest
    return loss, metrics, grads

  def update_rest(self, name: str, module: nnx.Module) -> None:
    """Stores `module`'s non-param variables as network `name`'s (state a family's step sets
    by hand rather than through a forward pass, e.g. an adaptive coefficient); the loop returns
    and checkpoints it like any other."""
    self.state['rest'][name] = nnx.state(module, nnx.Not(nnx.Param))

  def apply_gradients(self, name: str, grads) -> Metrics:
    """One optimizer update of network `name` (and its EMA); returns the gradient norm."""
    params = self.state['params'][name]
    mask = self._mask(name, params)
    updates, self.state['opt'][name] = self._optimizers[name].update(
        grads, self.state['opt'][name], params)
    new_params = optax.apply_updates(params, updates)
    if mask is not None:  # frozen params stay bit for bit (p + 0 would turn -0.0 into 0.0)
      new_params = tune.keep_frozen(new_params, params, mask)
    self.state['params'][name] = new_params
    if 'ema' in self.state and name in self.state['ema']:
      # ema <- decay * ema + (1 - decay) * params
      ema = self.state['ema'][name]
      new_ema = optax.incremental_update(new_params, ema, step_size=1.0 - self._ema_decay)
      self.state['ema'][name] = new_ema if mask is None else tune.keep_frozen(new_ema, ema, mask)
    if mask is not None:
      grads = tune.split_trained(grads, mask)[0]
    return {f'grad_norm/{name}' if len(self._optimizers) > 1 else 'grad_norm':
            optax.tree.norm(grads)}


def dropout_bits(model_config) -> int:
  """`config.model.dropout_bits`: random bits per dropout mask element (`models.layers.dropout`:
  32, the default and the value of runs written before the key, is `jax.random.bernoulli`; 8
  or 16 are cheaper masks). UserError for any other value."""
  bits = model_config.get('dropout_bits', 32)
  if bits not in layers.DROPOUT_BITS:
    raise UserError(f'config.model.dropout_bits={bits!r}: must be one of {layers.DROPOUT_BITS} '
                    '(random bits per dropout mask element)')
  return bits


class Family(abc.ABC):
  """A model family: networks, data, loss, evaluation and sampling for the shared loop.

  Subclasses set `name` and implement the abstract methods. The loop calls, in order:
  `setup_data` (host side, once), `make_models` (traced under eval_shape and jit: build modules,
  no host work), `optimizers`, then per step `train_batch` (host) and the jitted `train_step`.
  """

  name: str = ''
  #: What the throughput counter counts, e.g. 'tokens' or 'images'.
  unit: str = 'examples'

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    if 'model' in config:
      dropout_bits(config.model)   # a bad value stops the command before any work

  # ---- data (host side) ----
  @abc.abstractmethod
  def setup_data(self, process_index: int, process_count: int) -> None:
    """Loads datasets and vocabularies; raises UserError when they cannot be found."""

  @abc.abstractmethod
  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's share of the global batch for `step`; a pure function of (seed, step)."""

  @abc.abstractmethod
  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    """This process's share of each evaluation batch (the same batches at every eval)."""

  # ---- networks and optimisation (traced) ----
  @abc.abstractmethod
  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """The family's networks by name, e.g. {'model': GPT(...)}."""

  def optimizers(self, make_tx: Callable[[ml_collections.ConfigDict], optax.GradientTransformation]
                 ) -> dict[str, optax.GradientTransformation]:
    """One optax transformation per trained network; default: `config.optimizer` for 'model'."""
    return {'model': make_tx(self.config.optimizer)}

  @abc.abstractmethod
  def loss(self, models: dict[str, nnx.Module], batch: Batch, rng: jax.Array, *, train: bool
           ) -> tuple[jax.Array, Metrics]:
    """Scalar loss and metrics for a (micro-)batch."""

  def train_step(self, ctx: StepContext, batch: Batch, rng: jax.Array) -> Metrics:
    """One optimisation step; the default trains every network with its own optimizer on `loss`."""
    metrics = {}
    for name in ctx.state['opt']:
      loss, m, grads = ctx.value_and_grad(
          lambda models, b, r: self.loss(models, b, r, train=True), name, batch, rng)
      metrics.update(m, loss=loss, **ctx.apply_gradients(name, grads))
    return metrics

  def eval_step(self, models: dict[str, nnx.Module], batch: Batch) -> Metrics:
    """Metrics of one evaluation batch (means over the batch); default: the loss."""
    loss, metrics = self.loss(models, batch, jax.random.key(0), train=False)
    return {**metrics, 'loss': loss}

  def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    """Metrics computed on the host from averaged eval metrics (e.g. perplexity)."""
    return metrics

  # ---- reporting ----
  def items_per_step(self) -> int:
    """How many `unit`s one global batch holds (for throughput)."""
    return int(self.config.batch_size)

  def flops_per_step(self, abstract_params: dict[str, Any]) -> float | None:
    """Training FLOPs of one global batch from a stated formula, or None (then XLA's count).

    `abstract_params` maps each network's name to its params' shapes.
    """
    return None

  def networks_from_runs(self) -> dict[str, tuple[str, str, str]]:
    """Networks this family takes, frozen, from other runs (a distillation teacher, a DPO
    reference): {network: ('RUN_DIR[:STEP]', its name in that run, the config key that names
    the run, for errors)}. The loop loads them at a fresh start (train/tune.py
    `load_networks`); give them no optimizer, so they get no gradients and stay as loaded."""
    return {}

  def metadata(self) -> dict[str, Any]:
    """JSON-serialisable facts that sampling needs without the dataset (e.g. a vocabulary)."""
    return {}

  def load_metadata(self, metadata: dict[str, Any]) -> None:
    """Restores what `metadata` returned, in a process that did not call `setup_data`."""

  def write_run_files(self, workdir: str) -> None:
    """Writes files that sampling needs beside family.json (e.g. a tokenizer); called by the
    loop on process 0 after `setup_data`, at every start, so a resumed run can check them."""

  def read_run_files(self, workdir: str) -> None:
    """Reads what `write_run_files` wrote, after `load_metadata` (UserError when a file is
    missing or damaged)."""

  def write_samples(self, models: dict[str, nnx.Module], rng: jax.Array, path: str) -> None:
    """Writes a few samples (text, image grid) to `path` (without extension)."""

  #: The `train.sample` flags this family takes (train/sample.py defines them all); giving a
  #: flag that is not listed here is an error naming it.
  sample_flags: tuple[str, ...] = ()

  #: The `train.evaluate` flags this family takes (train/evaluate.py lists them all); giving
  #: one that is not listed here is an error naming it.
  evaluate_flags: tuple[str, ...] = ()

  def evaluate(self, models: dict[str, nnx.Module], workdir: str, step: int,
               options: dict[str, Any]) -> str:
    """`python -m train.evaluate`: computes the family's own metrics of checkpoint `step`
    with `options` (flag name -> value, None when not given), writes a JSON report under
    `workdir/eval/` (or `options['report']`), and returns the summary to print."""
    raise UserError(f'family {self.name!r} has no `train.evaluate` metrics')

  def sample(self, models: dict[str, nnx.Module], rng: jax.Array, workdir: str,
             options: dict[str, Any]) -> str:
    """`python -m train.sample`: samples with `options` (flag name -> value, None when not
    given), writes any files under `workdir`, and returns the text to print."""
    raise NotImplementedError(f'family {self.name!r} does not implement sampling')
