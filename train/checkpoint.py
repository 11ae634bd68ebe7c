"""Orbax checkpoints of the train state plus the data position.

The workdir is the resume key: `Checkpointer(workdir/checkpoints)` finds the latest finished
checkpoint and restores it straight into the shardings of the current mesh (which may differ
from the mesh that wrote it). Orbax writes each step to a temporary directory and renames it
when complete (on object stores, which cannot rename, it writes a commit marker last), so a
crash or kill mid-save never replaces the last good checkpoint. The directory may be any path
`etils.epath` knows (local or gs://).

Within one process, a replicated array is written from one replica: Orbax's replica-parallel
saving (its default on CPU) splits each replicated array into one slice per replica and writes
the slices in parallel, which pays only when several hosts share the writing; in one process it
only adds a compiled slice per array shape and replica (with 8 CPU devices, seconds per save of
even a tiny model). With several processes it stays on.

`step_bytes` (a step's bytes on disk) and `array_bytes` (e.g. of an optimizer state) size what
a run keeps, e.g. to compare fine-tuning methods (train/tuned_checkpoint.py).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store as ocp_array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry as ocp_registry

from train import storage
from train.errors import UserError


_replica_parallel = None  # what the registered jax.Array handler does (None: Orbax's default)


def _register_array_handler() -> None:
  """jax.Array's Orbax handler as Orbax registers it, replica-parallel only across processes
  (registered once per process, without Orbax's warning about replacing its default)."""
  global _replica_parallel
  wanted = jax.process_count() > 1
  if _replica_parallel is not wanted:
    ocp_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
        jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=ocp_array_metadata_store.Store(), use_replica_parallel=wanted),
        override=True, ignore_warnings=True)
    _replica_parallel = wanted


class Checkpointer:
  """Keeps the last `keep` checkpoints of {'state': train state, 'meta': JSON}."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    _register_array_handler()
    self.directory = storage.absolute(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON saved beside step `step`'s state ({} when it cannot be read: `restore` then
    reports the damage)."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored['meta'] or {})
    except Exception:  # pylint: disable=broad-except
      return {}

  def step_bytes(self, step: int) -> int:
    return step_bytes(self.directory, step)

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving (async: returns once arrays are copied off the devices)."""
    if step in self._manager.all_steps():
      return  # e.g. the final save of a run that ended on a checkpoint step
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def shape_differences(self, step: int, abstract_state: Any, limit: int = 4) -> list[str]:
    """How the arrays saved at `step` differ from `abstract_state` ('path: [saved] saved, [now]
    now', missing and extra arrays too); [] when they match or the metadata cannot be read."""
    try:
      saved = _shapes(self._manager.item_metadata(step)['state'].tree)
    except Exception:  # pylint: disable=broad-except
      return []  # unreadable metadata: restore() reports the damage
    now = _shapes(abstract_state)
    diffs = [f'{p}: {list(saved[p]) if p in saved else "absent"} saved, '
             f'{list(now[p]) if p in now else "absent"} now'
             for p in sorted(set(saved) | set(now)) if saved.get(p) != now.get(p)]
    return diffs[:limit] + ([f'{len(diffs) - limit} more'] if len(diffs) > limit else [])

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the shapes, dtypes and shardings of `abstract_state`.

    `abstract_state` leaves are `jax.ShapeDtypeStruct`s carrying a `sharding`.
    """
    quiet_restore_leftovers()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      # Orbax raises many types (ValueError, FileNotFoundError, tensorstore errors) for a
      # damaged or incompatible checkpoint; all mean the same to the user. Nothing is deleted.
      others = [s for s in self.all_steps() if s != step]
      hint = (f'; other checkpoints: steps {others} (move the damaged one aside to use them)'
              if others else '; move it aside to start afresh')
      raise UserError(f'checkpoint {self.directory}/{step} cannot be restored '
                      f'({failed_restore(e)}){hint}') from None
    return restored['state'], dict(restored['meta'])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def failed_restore(error: BaseException, limit: int = 300) -> str:
  """'Type: first line' of the root cause of a failed Orbax restore, for a one-line error.

  Orbax wraps a shard's read error (tensorstore's, which names the array and the file, e.g.
  'OUT_OF_RANGE: Error reading "params.model.wte.embedding.value/0.0" in OCDBT database ...')
  in an exception whose own text is the read's whole TensorStore spec; the root cause is the
  informative line.
  """
  root, seen = error, {id(error)}
  while root.__cause__ is not None and id(root.__cause__) not in seen:
    root = root.__cause__
    seen.add(id(root))
  first_line = (str(root).strip().splitlines() or [''])[0][:limit]
  return f'{type(root).__name__}: {first_line}' if first_line else type(root).__name__


def _is_restore_leftover(info) -> bool:
  """An unraisable error left by a failed restore (`quiet_restore_leftovers`)."""
  code = getattr(info.object, 'cr_code', None)
  return ((isinstance(info.exc_value, RuntimeError)
           and str(info.exc_value) == 'Event loop is closed')
          or (code is not None and '/orbax/' in code.co_filename.replace('\\', '/')))


def _not_never_retrieved(record: logging.LogRecord) -> bool:
  return 'exception was never retrieved' not in record.getMessage()


def quiet_restore_leftovers() -> None:
  """Keeps a failed restore's leftovers off stderr, so its error stays one line; call it
  before a restore.

  When one array of a checkpoint cannot be read, Orbax's restore raises while the reads of the
  other arrays are still in flight, and returns after closing its event loop. Those reads then
  end as noise from the threads and the garbage collector, printed after the error and some of
  it before: RuntimeError('Event loop is closed') from tensorstore's callbacks, asyncio's
  "exception was never retrieved" records, the closing of Orbax's coroutines, and "coroutine
  ... was never awaited" warnings. From the first call on, this process drops exactly these;
  everything else still reaches stderr. Each call reinstalls what a test harness may have
  reset (the unraisable hook, the warnings filter); none is installed twice.
  """
  hook = sys.unraisablehook
  if not getattr(hook, 'drops_restore_leftovers', False):
    def unraisable(info):
      if not _is_restore_leftover(info):
        hook(info)
    unraisable.drops_restore_leftovers = True
    sys.unraisablehook = unraisable
  asyncio_logger = logging.getLogger('asyncio')
  if _not_never_retrieved not in asyncio_logger.filters:
    asyncio_logger.addFilter(_not_never_retrieved)
  # An identical filter is moved to the front, not added again.
  warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)


def step_bytes(directory: str, step: int) -> int:
  """Bytes on disk of checkpoint `step` under the checkpoints `directory` (local or gs://)."""
  # iterdir() keeps the scheme of gs:// paths (epath's walk() and recursive glob do not).
  def size(path: epath.Path) -> int:
    return (sum(size(child) for child in path.iterdir()) if path.is_dir()
            else path.stat().length)
  return size(epath.Path(directory) / str(step))


def array_bytes(tree: Any) -> int:
  """Bytes of the array leaves of `tree` (arrays or ShapeDtypeStructs; all shards together)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, 'shape') and hasattr(x, 'dtype'))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/model/l1/kernel': shape} for the arrays of a state (or its saved metadata)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    out[name.removesuffix('/value')] = tuple(getattr(leaf, 'shape', ()))
  return out


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)

