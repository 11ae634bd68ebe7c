"""Checkpoints of tuned runs: what was trained, plus a record of the base run.

A run started with `config.init_from` that trains part of its params (`config.trainable` not
'all') saves, at every checkpoint, its trained params, their optimizer state and EMA, its
non-param variables and the step, but none of its frozen params: those are its base run's,
unchanged (or, for params new in this model, their init from the seed), nor the networks its
family takes frozen from other runs (meta `tune.NETWORKS_FROM` names them). The checkpoint's meta
names the base (`tune.FROZEN_FROM`: 'DIR:STEP', DIR absolute), so a checkpoint's size reflects
the fine-tuning method (a LoRA checkpoint holds the adapters and their Adam moments only).

Restoring such a checkpoint (resume in train/loop.py; `train.sample`, `train.evaluate` and
`train.export` through `train.run_loader.load_models`) redoes what the run's start did: the jitted
init, then the base run's params (`tune.load_init`, any mesh), then this checkpoint's arrays
on top. A base run that has gone is named in a one-line error; nothing is deleted.

The saved tree is a nested dict keyed by the parts of each kept leaf's path
('params/model/blocks/0/attn/qkv/lora/lora_a', 'opt/model/...', 'step'), so Orbax's metadata
lists exactly the arrays a checkpoint holds. Any other run keeps the whole state, as saved by
`train.checkpoint.Checkpointer` as is.
"""

from __future__ import annotations

from typing import Any

import jax

from train import checkpoint as ckpt_lib
from train import sharding as sharding_lib
from train import tune


def stores_trained_only(trainable: tune.Trainable, init_from: str) -> bool:
  """Whether a run's checkpoints leave its frozen params to its base run."""
  return bool(init_from) and not trainable.everything


def _kept(state: Any, trainable: tune.Trainable) -> list[tuple[str, Any]]:
  """(path, leaf) of what a trained-only checkpoint holds: all but the frozen params and
  their EMA (the step copies both through unchanged: they are the base run's)."""
  frozen = set()
  for group in ('params', 'ema'):
    for name, tree in state.get(group, {}).items():
      flat = jax.tree_util.tree_flatten_with_path(tree)[0]
      frozen.update(f'{group}/{name}/{sharding_lib.leaf_path(p)}'
                    for (p, _), trains in zip(flat, trainable.mask(name, tree)) if not trains)
  leaves = [(sharding_lib.leaf_path(p), x)
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]
  return [(p, x) for p, x in leaves if p not in frozen]


def pack(state: Any, trainable: tune.Trainable) -> dict[str, Any]:
  """What a trained-only checkpoint saves of `state` (arrays or ShapeDtypeStructs), nested by
  path: {'params': {'model': {...: {'lora_a': x}}}, 'opt': ..., 'step': x}."""
  nested: dict[str, Any] = {}
  for path, leaf in _kept(state, trainable):
    *parents, last = path.split('/')
    node = nested
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return nested


def saved_abstract(checkpointer: ckpt_lib.Checkpointer, step: int, abstract_state: Any,
                   trainable: tune.Trainable) -> Any:
  """The abstract tree that checkpoint `step` should hold (to compare with its metadata)."""
  if checkpointer.meta(step).get(tune.FROZEN_FROM):
    return pack(abstract_state, trainable)
  return abstract_state


def restore(checkpointer: ckpt_lib.Checkpointer, step: int, builder, shardings: Any,
            family_metadata: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(state in `shardings`, meta) of checkpoint `step`, of either kind.

  `builder` is the run's `loop.StateBuilder`; `family_metadata` its family.json, which the
  base run's must equal (as when the run started).
  """
  abstract = ckpt_lib.abstract_with_shardings(builder.abstract, shardings)
  base = checkpointer.meta(step).get(tune.FROZEN_FROM)
  if not base:
    return checkpointer.restore(step, abstract)
  part, meta = checkpointer.restore(step, pack(abstract, builder.trainable))
  state = builder.init(shardings)
  state, _, _ = tune.load_init(
      base, state, shardings, family_metadata,
      culprit=f'checkpoint {checkpointer.directory}/{step} (trained params only) needs its '
              f'base run {base} for the frozen ones')
  networks = meta.get(tune.NETWORKS_FROM) or {}
  if networks:  # frozen networks from other runs (Family.networks_from_runs): not saved either
    state, _ = tune.load_networks(
        {n: (spec, source, tune.NETWORKS_FROM) for n, (spec, source) in networks.items()},
        state, shardings, family_metadata,
        culprit=f'checkpoint {checkpointer.directory}/{step} (trained params only) needs')
  saved = {sharding_lib.leaf_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(part)[0]}
  state = jax.tree_util.tree_map_with_path(
      lambda p, x: saved.get(sharding_lib.leaf_path(p), x), state)
  return state, meta
