"""Pruning as a loop feature, for every family: fixed masks, fine-tuning with pruned weights at 0.

`config.prune` (experiments/configs/common.py):
  method:   'none' | 'magnitude' (global, unstructured: the `sparsity` share of the selected
            weights with the smallest |w| over all of them together, ties broken by position)
            | '2:4' (N:M structured, Mishra et al. 2021: in every group of 4 consecutive weights
            along a kernel's input dimension, the 2 of largest |w| kept; 50% by construction,
            `sparsity` is not used).
  sparsity: the share of the selected weights pruned by 'magnitude', in [0, 1).
  params:   a regex searched in '/'-joined param paths ('model/blocks/0/mlp/fc/kernel'); the
            default, r'kernel$' with at least 2 dims, selects every nnx.Linear / nnx.Conv
            kernel. For the GPT that is the attention qkv and output projections and the MLP's
            two layers of every block: not the embeddings (wte, which the tied output layer
            reuses, and wpe), biases or layer norms.
Only networks that train (those with an optimizer) are pruned: a distillation teacher is not.

How the masks stay fixed: they are computed once, at the first start of a run (after
`config.init_from` has loaded the weights to prune), from those weights, and kept in the
optimizer state as booleans (`PruneState.masks`; checkpointed with it, so a resumed run keeps
them exactly). The pruned weights are set to 0 then (EMA included), and the optimizer is wrapped
so that it sees zero gradients there and returns zero updates there: Adam's moments of a pruned
weight stay 0, weight decay of a 0 weight is 0, and the final projection of the updates makes
"pruned stays exactly 0" hold for any optax optimizer. That is one optax transformation around
the family's, so neither the loop's step nor any family knows about pruning. (`optax.masked`
masks whole leaves, not elements, so it does not fit.)
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from train import sharding as sharding_lib
from train.errors import UserError

METHODS = ('none', 'magnitude', '2:4')
DEFAULT_PARAMS = r'kernel$'
# 2:4: groups of GROUP consecutive weights along the input dimension keep KEEP of them.
GROUP, KEEP = 4, 2


class PruneState(NamedTuple):
  """`masks`: per param leaf, bool (True = kept) of its shape, or `optax.MaskedNode()` for a
  leaf that is not pruned; `inner`: the wrapped optimizer's state."""
  masks: Any
  inner: Any


def _is_masked_node(x) -> bool:
  return isinstance(x, optax.MaskedNode)


class Pruning:
  """`config.prune`, checked: which params of a network are pruned, and how."""

  def __init__(self, config: ml_collections.ConfigDict):
    prune = config.get('prune') or {}
    self.method = str(prune.get('method', 'none') or 'none')
    if self.method not in METHODS:
      raise UserError(f'config.prune.method={self.method!r}: unknown (use one of '
                      f'{", ".join(METHODS)})')
    try:
      self.sparsity = float(prune.get('sparsity', 0.0) or 0.0)
    except (TypeError, ValueError):
      raise UserError(f'config.prune.sparsity={prune.get("sparsity")!r}: must be a number '
                      'in [0, 1)') from None
    if not 0.0 <= self.sparsity < 1.0:
      raise UserError(f'config.prune.sparsity={self.sparsity}: must be in [0, 1) (the share '
                      'of the selected weights set to 0)')
    spec = str(prune.get('params', DEFAULT_PARAMS) or DEFAULT_PARAMS)
    try:
      self.pattern = re.compile(spec)
    except re.error as e:
      raise UserError(f'config.prune.params={spec!r}: bad regex ({e})') from None
    self._counters = {}  # pruned networks -> jitted count of zeros
    if self.enabled and str(config.get('trainable', 'all') or 'all') != 'all':
      # A frozen param of a tuned run is re-read from its base at every restore: it would
      # come back unpruned.
      raise UserError(f'config.prune.method={self.method!r} needs config.trainable=\'all\' '
                      f'(not {config.trainable!r})')

  @property
  def enabled(self) -> bool:
    return self.method != 'none'

  def selected(self, name: str, params: Any) -> list[bool]:
    """Per leaf of network `name`'s params (flatten order): True when it is pruned."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [x.ndim >= 2 and bool(self.pattern.search(f'{name}/{sharding_lib.leaf_path(p)}'))
            for p, x in flat]

  def check(self, abstract_params: dict[str, Any], pruned_networks) -> None:
    """UserError when the regex selects no param of the networks that train."""
    if self.enabled and not any(any(self.selected(n, abstract_params[n]))
                                for n in pruned_networks):
      raise UserError(f'config.prune.params={self.pattern.pattern!r}: selects no param of '
                      f'{", ".join(pruned_networks)} (paths look like '
                      '\'model/blocks/0/mlp/fc/kernel\'; only arrays of 2 or more dims count)')

  # ---- masks ----
  def masks(self, name: str, params: Any) -> Any:
    """The masks of network `name`'s params (traceable): bool, True = kept, for the selected
    leaves; `optax.MaskedNode()` for the others."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [x for _, x in flat]
    selected = self.selected(name, params)
    if not any(selected):
      kept = []
    elif self.method == 'magnitude':
      kept = magnitude_masks([x for x, s in zip(leaves, selected) if s], self.sparsity)
    else:
      for (path, x), s in zip(flat, selected):
        if s and x.shape[-2] % GROUP:
          raise UserError(f'config.prune.method=\'2:4\': {name}/{sharding_lib.leaf_path(path)} '
                          f'has input dimension {x.shape[-2]}, not a multiple of {GROUP}')
      kept = [n_of_m_mask(x) for x, s in zip(leaves, selected) if s]
    it = iter(kept)
    return treedef.unflatten([next(it) if s else optax.MaskedNode() for s in selected])

  def wrap_optimizer(self, name: str, tx: optax.GradientTransformation
                     ) -> optax.GradientTransformation:
    """`tx` with network `name`'s pruned weights getting zero gradients and zero updates; its
    state holds the masks, computed by `init` from the params it is given."""
    if not self.enabled:
      return tx

    def init(params):
      return PruneState(masks=self.masks(name, params), inner=tx.init(params))

    def update(updates, state, params=None):
      updates = apply_masks(state.masks, updates)
      updates, inner = tx.update(updates, state.inner, params)
      return apply_masks(state.masks, updates), PruneState(state.masks, inner)

    return optax.GradientTransformation(init, update)

  def start(self, state: dict[str, Any], optimizers, shardings) -> dict[str, Any]:
    """At a run's first start: masks from the params now in `state` (after init_from) into the
    optimizer state, the pruned params (and their EMA) set to 0. Jitted, in `shardings`."""
    if not self.enabled:
      return state

    def prune(state):
      state = {**state, 'params': dict(state['params']), 'opt': dict(state['opt'])}
      if 'ema' in state:
        state['ema'] = dict(state['ema'])
      for name, tx in optimizers.items():
        state['opt'][name] = tx.init(state['params'][name])  # a fresh optimizer: masks new
        masks = state['opt'][name].masks
        state['params'][name] = apply_masks(masks, state['params'][name])
        if 'ema' in state and name in state['ema']:
          state['ema'][name] = apply_masks(masks, state['ema'][name])
      return state

    return jax.jit(prune, out_shardings=shardings, donate_argnums=0)(state)

  def sparsity_reached(self, params: dict[str, Any], pruned_networks) -> dict[str, float]:
    """{'sparsity': share of exactly-0 weights among the selected ones, 'pruned_weights': how
    many are 0, 'prunable_weights': how many are selected} (the networks in `pruned_networks`)."""
    networks = tuple(pruned_networks)
    if networks not in self._counters:  # one compile per run, not one per eval
      def count(params):
        zeros = total = 0
        for name in networks:
          for x, s in zip(jax.tree.leaves(params[name]), self.selected(name, params[name])):
            if s:
              zeros += jnp.sum(x == 0)
              total += x.size
        return zeros, total
      self._counters[networks] = jax.jit(count)
    zeros, total = jax.device_get(self._counters[networks]({n: params[n] for n in networks}))
    total = int(total)
    return {'sparsity': int(zeros) / max(total, 1), 'pruned_weights': int(zeros),
            'prunable_weights': total}


def apply_masks(masks: Any, tree: Any) -> Any:
  """`tree` with 0 where a mask is False (leaves whose mask is a MaskedNode pass as they are)."""
  return jax.tree.map(lambda m, x: x if _is_masked_node(m) else jnp.where(m, x, jnp.zeros_like(x)),
                      masks, tree, is_leaf=_is_masked_node)


def magnitude_masks(kernels: list[jax.Array], sparsity: float) -> list[jax.Array]:
  """Global magnitude pruning: False for the round(sparsity * N) weights of smallest |w| over
  all `kernels` together (N weights in all); ties go by position (a stable sort)."""
  flat = jnp.concatenate([jnp.abs(x).ravel() for x in kernels])  # [N]
  n_pruned = int(round(sparsity * flat.size))
  order = jnp.argsort(flat, stable=True)
  kept = jnp.ones(flat.shape, bool).at[order[:n_pruned]].set(False)
  out, offset = [], 0
  for x in kernels:
    out.append(kept[offset:offset + x.size].reshape(x.shape))
    offset += x.size
  return out


def n_of_m_mask(kernel: jax.Array, n: int = KEEP, m: int = GROUP) -> jax.Array:
  """N:M structured sparsity along the input dimension (axis -2 of `[..., in, out]`): in every
  group of m consecutive input rows of one output column, the n of largest |w| are kept (ties:
  the earlier position)."""
  *lead, d_in, d_out = kernel.shape
  groups = jnp.abs(kernel).reshape(*lead, d_in // m, m, d_out)  # [..., in/m, m, out]
  order = jnp.argsort(-groups, axis=-2, stable=True)            # largest first
  rank = jnp.argsort(order, axis=-2)                            # each weight's place in its group
  return (rank < n).reshape(kernel.shape)
