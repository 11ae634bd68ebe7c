"""Fine-tuning as loop features, for every family: LoRA surgery, trainable params, init_from.

* `apply_lora`: `config.lora` (rank > 0) wraps the matching `nnx.Linear`s (`nnx.Embed`s) of
  freshly built networks in `models.lora.LoRALinear` (`LoRAEmbed`) (base param paths unchanged,
  adapters added).
* `apply_quantization`: `config.quantize` (mode 'int8_weights' or 'int8'; qat) quantizes the
  Linear and Conv layers of freshly built networks with qwix (`models.quantize`): int8 params
  (post-training, written by `python -m train.quantize`), or fake quantization in training
  (qat=True), whose params keep their float paths.
* `Trainable`: `config.trainable` ('all', 'lora', 'prompt' or a regex over '/'-joined param
  paths such as 'model/blocks/0/attn/qkv/kernel') splits each network's params into trained and frozen ones.
  Frozen params are constants of the loss (no gradient is computed for them), their optimizer
  state does not exist (`optax.multi_transform` with `optax.set_to_zero`: the trained
  transformation's state holds `optax.MaskedNode`s in their place), and the step copies them
  through unchanged, bit for bit (EMA included).
* `load_init`: `config.init_from` ('RUN_DIR[:STEP]') overwrites a new run's initial params (and
  non-param variables) with another run's, read from its Orbax checkpoint straight into this
  run's shardings (any mesh), matched by path; config.json's `init_from` (with the step
  resolved) records the base. A tuned run's checkpoints hold only what it trained and name
  their base (train/tuned_checkpoint.py): such a base is read through its own base first.
* `load_networks`: whole networks that a family takes, frozen, from other runs
  (`Family.networks_from_runs`: a distillation teacher, a DPO reference), read the same way
  under this run's network name.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp
from flax import nnx

from models import lora as lora_lib
from models import quantize as quantize_lib
from models import rngs as rngs_lib
from train import checkpoint as checkpoint_lib
from train import optim
from train import sharding as sharding_lib
from train import storage
from train.errors import UserError

LORA_PARAMS = r'/lora/lora_(a|b|magnitude)$'   # magnitude: DoRA's (models/lora.py)
LORA_B = r'/lora/lora_b$'
PROMPT_PARAMS = r'^model/prompt$'   # the GPT's soft prompt (config.model.prompt_tokens)
NAMED = {'lora': LORA_PARAMS, 'prompt': PROMPT_PARAMS}
# The meta key of a checkpoint that holds only what its run trained: 'DIR:STEP' of the base run
# whose checkpoint holds the frozen params (train/tuned_checkpoint.py).
FROZEN_FROM = 'frozen_from'
# The meta key naming where the networks of `Family.networks_from_runs` came from:
# {network: ['DIR:STEP', its name in that run]} (a trained-only checkpoint reloads them).
NETWORKS_FROM = 'networks_from'


# ---------------------------------------------------------------------------------------------
# LoRA surgery.
# ---------------------------------------------------------------------------------------------
def lora_rank(config: ml_collections.ConfigDict) -> int:
  lora = config.get('lora') or {}
  return int(lora.get('rank', 0) or 0)


def apply_lora(models: dict[str, nnx.Module], config: ml_collections.ConfigDict,
               key: jax.Array) -> dict[str, nnx.Module]:
  """`config.lora` adapters on `models` in place (nothing when lora.rank is 0)."""
  rank = lora_rank(config)
  if rank == 0:
    return models
  lora = config.lora
  if rank < 0:
    raise UserError(f'config.lora.rank={rank}: must be >= 1 (0: no LoRA)')
  try:
    re.compile(lora.targets)
  except re.error as e:
    raise UserError(f'config.lora.targets={lora.targets!r}: bad regex ({e})') from None
  embed_rank = int(lora.get('embed_rank', 0) or 0)
  if embed_rank < 0:
    raise UserError(f'config.lora.embed_rank={embed_rank}: must be >= 0 (0: lora.rank)')
  rngs = rngs_lib.rngs(key)
  wrapped, linears = [], []
  for name, model in models.items():
    linears += lora_lib.linear_paths(model, name)
    try:
      wrapped += lora_lib.apply_lora(model, targets=lora.targets, rank=rank,
                                     alpha=float(lora.alpha), rngs=rngs, prefix=name,
                                     embed_rank=embed_rank, dora=bool(lora.get('dora', False)))
    except ValueError as e:
      ranks = f'rank={rank}' + (f', embed_rank={embed_rank}' if embed_rank else '')
      raise UserError(f'config.lora.{ranks}: {e}') from None
  if not wrapped:
    raise UserError(f'config.lora.targets={lora.targets!r}: matches no nnx.Linear or '
                    'nnx.Embed module '
                    f'(their paths: {", ".join(linears[:4]) or "none"}'
                    f'{", ..." if len(linears) > 4 else ""})')
  return models


def lora_plus(config: ml_collections.ConfigDict, tx: optax.GradientTransformation
              ) -> optax.GradientTransformation:
  """`tx` with the LoRA B matrices' updates times `config.lora.b_lr_ratio` (LoRA+).

  LoRA+ (Hayou, Ghosh and Yu, 2024, arXiv:2402.12354) trains B, the output-side matrix
  `[rank, out]` (in a Linear's adapter the one that starts at zero), with a learning rate
  lambda times A's; on `tx`'s final update this scales B's learning rate (and its decoupled
  weight decay, as a larger per-group lr does in AdamW) by lambda. Every '.../lora/lora_b'
  scales, an Embed's table update's too. 1 (or the key absent): plain LoRA.
  """
  lora = config.get('lora') or {}
  ratio = float(lora.get('b_lr_ratio', 1.0))   # absent in older runs: 1
  if not ratio > 0:
    raise UserError(f'config.lora.b_lr_ratio={ratio}: must be > 0 (1: plain LoRA)')
  if ratio == 1.0 or lora_rank(config) == 0:
    return tx
  return optim.scale_updates(
      tx, ratio, lambda path: re.search(LORA_B, sharding_lib.leaf_path(path)) is not None)


# ---------------------------------------------------------------------------------------------
# Quantization.
# ---------------------------------------------------------------------------------------------
def quantize_mode(config: ml_collections.ConfigDict) -> str:
  """config.quantize.mode ('' when the run is not quantized; runs older than the key too)."""
  return str((config.get('quantize') or {}).get('mode', '') or '')


def quantize_qat(config: ml_collections.ConfigDict) -> bool:
  return bool((config.get('quantize') or {}).get('qat', False))


def post_training_quantized(config: ml_collections.ConfigDict) -> bool:
  """Whether the run's params are int8 (quantized after training): such a run does not train."""
  return bool(quantize_mode(config)) and not quantize_qat(config)


def check_quantize(config: ml_collections.ConfigDict, *, training: bool = False) -> None:
  """UserError for an unknown config.quantize.mode, quantization with LoRA, and (`training`)
  a post-training-quantized run given to the train loop."""
  mode = quantize_mode(config)
  if not mode:
    if quantize_qat(config):
      raise UserError('config.quantize.qat=True needs config.quantize.mode (one of '
                      f'{", ".join(quantize_lib.MODES)})')
    return
  if mode not in quantize_lib.MODES:
    raise UserError(f'config.quantize.mode={mode!r}: unknown quantization mode; use one of '
                    f'{", ".join(quantize_lib.MODES)} (or \'\' for none)')
  if lora_rank(config):
    raise UserError(f'config.quantize.mode={mode!r} with config.lora.rank='
                    f'{lora_rank(config)}: quantize a LoRA run after merging its adapters '
                    '(python -m train.export --merge_lora)')
  if training and not quantize_qat(config):
    raise UserError(f'config.quantize.mode={mode!r}: a post-training-quantized model (int8 '
                    'params) does not train; set config.quantize.qat=True for '
                    'quantization-aware training, or quantize a trained run with '
                    'python -m train.quantize')


def apply_quantization(models: dict[str, nnx.Module], config: ml_collections.ConfigDict
                       ) -> dict[str, nnx.Module]:
  """`config.quantize` on `models` in place (nothing when quantize.mode is empty)."""
  mode = quantize_mode(config)
  if not mode:
    return models
  check_quantize(config)
  for name, model in models.items():
    try:
      quantize_lib.quantize(model, mode=mode, qat=quantize_qat(config))
    except ValueError as e:
      raise UserError(f'config.quantize.mode={mode!r}: network {name!r}: {e}') from None
  return models


# ---------------------------------------------------------------------------------------------
# Trained and frozen params.
# ---------------------------------------------------------------------------------------------
class Trainable:
  """Which params of each network train (`config.trainable`)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.spec = str(config.get('trainable', 'all') or 'all')
    regex = None if self.spec == 'all' else NAMED.get(self.spec, self.spec)
    try:
      self.pattern = None if regex is None else re.compile(regex)
    except re.error as e:
      raise UserError(f'config.trainable={self.spec!r}: bad regex ({e}); use all, lora, '
                      'prompt or a regex over param paths') from None

  @property
  def everything(self) -> bool:
    return self.pattern is None

  def mask(self, name: str, params: Any) -> list[bool]:
    """Per leaf of network `name`'s params (flatten order): True when it trains."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if self.pattern is None:
      return [True] * len(flat)
    return [bool(self.pattern.search(f'{name}/{sharding_lib.leaf_path(p)}')) for p, _ in flat]

  def wrap_optimizer(self, name: str, tx: optax.GradientTransformation
                     ) -> optax.GradientTransformation:
    """`tx` on the trained params only; frozen ones get a zero update and no state."""
    if self.pattern is None:
      return tx

    def labels(params):
      treedef = jax.tree.structure(params)
      return treedef.unflatten(['trained' if m else 'frozen' for m in self.mask(name, params)])

    return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)

  def count(self, abstract_params: dict[str, Any]) -> int:
    """How many scalars train (all networks)."""
    return sum(x.size for n, tree in abstract_params.items()
               for x, m in zip(jax.tree.leaves(tree), self.mask(n, tree)) if m)

  def check(self, abstract_params: dict[str, Any], trained_networks) -> None:
    """UserError when the regex trains no param of any optimised network."""
    if self.pattern is None:
      return
    if not any(any(self.mask(n, abstract_params[n])) for n in trained_networks):
      example = next(iter(jax.tree_util.tree_flatten_with_path(abstract_params)[0]), None)
      hint = (' (set config.lora.rank >= 1 to add LoRA adapters)' if self.spec == 'lora'
              else ' (set config.model.prompt_tokens >= 1 to add a soft prompt)'
              if self.spec == 'prompt'
              else f' (paths look like {sharding_lib.leaf_path(example[0])!r})' if example
              else '')
      raise UserError(f'config.trainable={self.spec!r}: matches no parameter{hint}')


def split_trained(params: Any, mask: list[bool]
                  ) -> tuple[list[jax.Array], Callable[[list[jax.Array]], Any]]:
  """(trained leaves, rebuild): rebuild(trained leaves) puts them back among the frozen ones."""
  leaves, treedef = jax.tree.flatten(params)
  trained = [x for x, m in zip(leaves, mask) if m]

  def rebuild(new_trained):
    it = iter(new_trained)
    return treedef.unflatten([next(it) if m else x for x, m in zip(leaves, mask)])

  return trained, rebuild


def keep_frozen(new: Any, old: Any, mask: list[bool]) -> Any:
  """`new` with its frozen leaves taken from `old` (bit for bit)."""
  new_leaves, treedef = jax.tree.flatten(new)
  old_leaves = jax.tree.leaves(old)
  return treedef.unflatten([n if m else o for n, o, m in zip(new_leaves, old_leaves, mask)])


# ---------------------------------------------------------------------------------------------
# init_from.
# ---------------------------------------------------------------------------------------------
def parse_init_from(text: str) -> tuple[str, int | None]:
  """'DIR' or 'DIR:STEP' (a DIR such as gs://b/run keeps its colon)."""
  head, sep, tail = text.rpartition(':')
  if sep and tail.isdigit() and head:
    return head, int(tail)
  return text, None


def _flat(tree: Any) -> dict[str, Any]:
  return {sharding_lib.leaf_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _prune(node: Any, path: str, keep: dict[str, Any]) -> Any:
  """The part of a saved metadata tree whose leaves are in `keep`, leaves replaced by them."""
  if isinstance(node, dict):
    out = {k: _prune(v, f'{path}/{k}' if path else str(k), keep) for k, v in node.items()}
    out = {k: v for k, v in out.items() if v is not None}
    return out or None
  if isinstance(node, (list, tuple)):
    return None  # optimizer states; params and variables are dicts
  return keep.get(path.removesuffix('/value'))


def load_init(spec: str, state: dict[str, Any], shardings: dict[str, Any],
              metadata: dict[str, Any], culprit: str | None = None
              ) -> tuple[dict[str, Any], str, list[str]]:
  """`state` with its 'params' and 'rest' overwritten by run `spec`'s, in `shardings`.

  Returns (state, 'DIR:STEP' as resolved (DIR made absolute), paths that kept their fresh
  init).
  `metadata` is this run's `family.metadata()`: a base run whose family.json states another
  value for one of its keys (e.g. another vocabulary) is refused, since its embedding rows would
  mean other tokens; keys only the base states are ignored. `culprit`
  starts every error line (default 'config.init_from=SPEC').
  """
  now = {p: x for p, x in _flat(state).items() if p.startswith(('params/', 'rest/'))}
  loaded, resolved = _read_run(spec, now, _flat(shardings), metadata,
                               culprit or f'config.init_from={spec}')

  new_state = _overwrite(state, loaded)
  if 'ema' in state:  # the EMA starts where the params start
    new_state['ema'] = {n: jax.tree.map(lambda x: x.copy(), new_state['params'][n])
                        for n in state['ema']}
  fresh = sorted(p for p in now if p not in loaded)
  return new_state, resolved, fresh


def _overwrite(state: dict[str, Any], loaded: dict[str, jax.Array]) -> dict[str, Any]:
  """`state` with its 'params' and 'rest' leaves replaced by `loaded`'s ({path: array})."""
  new_state = dict(state)
  for group in ('params', 'rest'):
    new_state[group] = jax.tree_util.tree_map_with_path(
        lambda p, x, g=group: loaded.get(
            sharding_lib.leaf_path((jax.tree_util.DictKey(g),) + p), x), state[group])
  return new_state


def load_networks(sources: dict[str, tuple[str, str, str]], state: dict[str, Any],
                  shardings: dict[str, Any], metadata: dict[str, Any],
                  culprit: str | None = None) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """`state` with whole networks read from other runs (`Family.networks_from_runs`:
  {network: (spec, its name in that run, config key)}), in `shardings`.

  Every param and variable of such a network must come from its run (a frozen network left
  at its random init would be a silent bug). Returns (state, {network: ['DIR:STEP', its name
  there]}), the record a checkpoint's meta keeps (`NETWORKS_FROM`). Errors start with
  'KEY=SPEC', or with `culprit` when given.
  """
  flat_state, flat_shardings = _flat(state), _flat(shardings)
  record = {}
  for network, (spec, source, key) in sources.items():
    where = f'{culprit} (network {network!r} from {spec})' if culprit else f'{key}={spec}'
    now = {p: x for p, x in flat_state.items()
           if p.startswith((f'params/{network}/', f'rest/{network}/'))}
    loaded, resolved = _read_run(spec, now, flat_shardings, metadata, where,
                                 networks={network: source})
    missing = sorted(p for p in now if p not in loaded)
    if missing:
      raise UserError(f'{where}: its network {source!r} lacks {len(missing)} array(s) that '
                      f'{network!r} needs here (e.g. {missing[0]}); is it a run of this shape?')
    state = _overwrite(state, loaded)
    record[network] = [resolved, source]
  return state, record


def metadata_fits(base: Any, metadata: dict[str, Any]) -> bool:
  """Whether a base run's family.json (`base`) states every fact of this run's `metadata`
  alike; the base may state more (e.g. a BERT run's baseline figures, when a retriever starts
  from it)."""
  missing = object()
  return isinstance(base, dict) and all(
      base.get(k, missing) == v for k, v in json.loads(json.dumps(metadata)).items())


def _read_run(spec: str, now: dict[str, Any], now_shardings: dict[str, Any],
              metadata: dict[str, Any], culprit: str, networks: dict[str, str] | None = None
              ) -> tuple[dict[str, jax.Array], str]:
  """({path: array} of run `spec`'s params and non-param variables that `now` has, in
  `now_shardings`; 'DIR:STEP' with DIR absolute). A checkpoint that holds only what its run
  trained (its meta names the base: `FROZEN_FROM`) is laid over what its base holds.

  `networks` ({network here: its name in run `spec`}) reads only those networks, renamed;
  None reads every network under its own name."""
  sources = None if networks is None else {src: here for here, src in networks.items()}

  def here(path: str) -> str | None:
    """A path of run `spec` ('params/NET/...') as this run's, or None when not read."""
    if sources is None:
      return path
    group, _, tail = path.partition('/')
    net, _, tail = tail.partition('/')
    return f'{group}/{sources[net]}/{tail}' if net in sources else None

  directory, step = parse_init_from(spec)
  directory = storage.absolute(directory)
  checkpoints = storage.join(directory, 'checkpoints')
  if not storage.isdir(checkpoints):
    raise UserError(f'{culprit}: no checkpoint in {checkpoints}')
  manager = ocp.CheckpointManager(
      checkpoints,
      options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})
  try:
    steps = list(manager.all_steps())
    if not steps:
      raise UserError(f'{culprit}: no checkpoint in {checkpoints}')
    step = max(steps) if step is None else step
    if step not in steps:
      raise UserError(f'{culprit}: no checkpoint at step {step} (steps: {sorted(steps)})')
    family_path = storage.join(directory, 'family.json')
    if storage.isfile(family_path):
      if not metadata_fits(storage.read_json(family_path, culprit), metadata):
        raise UserError(f'{culprit}: its family.json (vocabulary, shapes) differs from this '
                        "run's data; fine-tune on data with the base run's vocabulary")
    try:
      saved_tree = manager.item_metadata(step)['state'].tree
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'{culprit}: checkpoint {step} cannot be read ({type(e).__name__}: '
                      f'{(str(e).strip().splitlines() or [""])[0][:200]})') from None
    loaded = {}
    if (meta or {}).get(FROZEN_FROM):
      # A tuned run: its frozen params are its base's.
      loaded = _read_run(meta[FROZEN_FROM], now, now_shardings, metadata,
                         f'{culprit} (tuned from {meta[FROZEN_FROM]})', networks)[0]
    saved = {p.removesuffix('/value'): x for p, x in _flat(saved_tree).items()
             if p.startswith(('params/', 'rest/')) and here(p) is not None}
    bad = [f'{p}: {list(saved[p].shape)} in the base run, {list(now[here(p)].shape)} here'
           for p in sorted(saved)
           if here(p) in now and tuple(saved[p].shape) != tuple(now[here(p)].shape)]
    bad += [f'{p}: not in this model' for p in sorted(saved) if here(p) not in now]
    if bad:
      raise UserError(f'{culprit}: the base run\'s params do not fit this model ('
                      + '; '.join(bad[:6]) + (f'; {len(bad) - 6} more' if len(bad) > 6 else '')
                      + ')')
    keep = {p: jax.ShapeDtypeStruct(now[here(p)].shape, now[here(p)].dtype,
                                    sharding=now_shardings[here(p)]) for p in saved}
    item = _prune(saved_tree, '', keep)
    if item is None:
      return loaded, f'{directory}:{step}'
    checkpoint_lib.quiet_restore_leftovers()
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True), meta=ocp.args.JsonRestore()))['state']
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'{culprit}: checkpoint {step} cannot be restored '
                      f'({checkpoint_lib.failed_restore(e)})') from None
  finally:
    manager.close()
  loaded.update({here(p.removesuffix('/value')): x for p, x in _flat(restored).items()})
  return loaded, f'{directory}:{step}'
