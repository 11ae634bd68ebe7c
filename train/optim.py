"""optax optimizers and learning-rate schedules from a config group.

Keys of an optimizer group (e.g. `config.optimizer`):
  name: 'adamw' | 'adam' | 'sgd';  lr: peak learning rate;  schedule: 'cosine' | 'constant';
  warmup_steps; decay_steps (cosine: steps from 0 to the end of decay, warmup included);
  min_lr (cosine end value); b1, b2 (adam, adamw); momentum (sgd, 0 = none); weight_decay (adamw: applied to arrays with ndim >= 2 only,
  i.e. matmul kernels and embeddings, not biases or norms, as in nanoGPT); grad_clip (global
  norm, 0 = off).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from train.errors import UserError

_NAMES = ('adamw', 'adam', 'sgd')
_SCHEDULES = ('cosine', 'constant')


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  schedule = cfg.get('schedule', 'constant')
  if schedule not in _SCHEDULES:
    raise UserError(f'config.optimizer.schedule={schedule!r}: unknown (known: {_SCHEDULES})')
  warmup = int(cfg.get('warmup_steps', 0))
  if schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(int(cfg.decay_steps), warmup + 1), end_value=cfg.get('min_lr', 0.0))
  if warmup:
    return optax.linear_schedule(0.0, cfg.lr, warmup)
  return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optax transformation described by one optimizer config group."""
  if cfg.name not in _NAMES:
    raise UserError(f'config.optimizer.name={cfg.name!r}: unknown (known: {_NAMES})')
  lr = make_schedule(cfg)
  if cfg.name == 'sgd':
    tx = optax.sgd(lr, momentum=cfg.get('momentum', None) or None)
  elif cfg.name == 'adam':
    tx = optax.adam(lr, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.999))
  else:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.adamw(lr, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.999),
                     weight_decay=cfg.get('weight_decay', 0.0), mask=decay_mask)
  clip = cfg.get('grad_clip', 0.0)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def scale_updates(tx: optax.GradientTransformation, factor: float,
                  where: Callable[[Any], bool]) -> optax.GradientTransformation:
  """`tx` with its final updates times `factor` on the leaves whose key path `where` accepts:
  their learning rate (and decoupled weight decay) `factor` times the rest's; no extra state."""
  def scale(path, update):
    return update * factor if where(path) else update

  return optax.chain(tx, optax.stateless(
      lambda updates, _: jax.tree_util.tree_map_with_path(scale, updates)))
