"""Run-directory I/O through `etils.epath`: local paths and `gs://` (any scheme epath knows) alike.

Orbax reads and writes checkpoints through epath too, so a `--workdir=gs://BUCKET/run` keeps
config.json, family.json, metrics.jsonl, TensorBoard events, samples, eval reports and
checkpoints in the bucket, from one process or many. Remote paths need `gcsfs` (epath's fsspec
backend for gs://); an emulator is reached through `STORAGE_EMULATOR_HOST` (gcsfs) and
`TENSORSTORE_GCS_HTTP_URL` (tensorstore, Orbax's array backend).

Object stores have no append and no rename, so files are written whole: a local file through a
temporary file and `os.replace` (a kill leaves the old file or the new one), a GCS object by one
upload (atomic by itself).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

from etils import epath

from train.errors import UserError


def is_local(path: str | os.PathLike) -> bool:
  return '://' not in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """An absolute local path, or the URI unchanged."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path


def join(path: str | os.PathLike, *parts: str) -> str:
  return os.fspath(epath.Path(path).joinpath(*parts))


def exists(path) -> bool:
  return epath.Path(path).exists()


def isdir(path) -> bool:
  return epath.Path(path).is_dir()


def isfile(path) -> bool:
  p = epath.Path(path)
  return p.exists() and not p.is_dir()


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def write_bytes(path, data: bytes) -> None:
  """Writes `data` whole: readers see the old content or the new one, never a part."""
  path = os.fspath(path)
  if not is_local(path):
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def read_text(path) -> str:
  return epath.Path(path).read_text(encoding='utf-8')


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def read_json(path, culprit: str) -> Any:
  """The JSON object in `path`; a missing or damaged file is a UserError naming `culprit`."""
  path = os.fspath(path)
  try:
    text = read_text(path)
  except FileNotFoundError:
    raise UserError(f'{culprit}: no {os.path.basename(path)} ({path})') from None
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'{culprit}: cannot read {path} ({type(e).__name__}: {e})') from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f'{culprit}: {path} is damaged (not JSON: {e})') from None
  if not isinstance(value, dict):
    raise UserError(f'{culprit}: {path} is damaged (a JSON {type(value).__name__}, '
                    'not an object)')
  return value


def copy_tree(local_dir: str, target) -> None:
  """Copies the files under the local directory `local_dir` to `target` (any epath path)."""
  for root, _, files in os.walk(local_dir):
    for name in files:
      source = os.path.join(root, name)
      destination = epath.Path(join(target, os.path.relpath(source, local_dir)))
      destination.parent.mkdir(parents=True, exist_ok=True)  # a no-op on object stores
      with open(source, 'rb') as f:
        write_bytes(destination, f.read())


def save_image(path, image) -> None:
  """Saves a PIL image (format from the extension)."""
  buffer = io.BytesIO()
  image.save(buffer, format=os.path.splitext(os.fspath(path))[1][1:].upper() or 'PNG')
  write_bytes(path, buffer.getvalue())


def check_writable(directory) -> None:
  """UserError unless files can be created in `directory` (which must exist)."""
  probe = epath.Path(directory) / f'.genlab-write-probe-{uuid.uuid4().hex[:8]}'
  try:
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as e:
    reason = getattr(e, 'strerror', None) or str(e).splitlines()[0][:200]
    raise UserError(f'--workdir={directory}: cannot write in it ({reason})') from None


class JsonLines:
  """metrics.jsonl: rows appended in order; whole-object rewrites where there is no append."""

  def __init__(self, path):
    self.path = os.fspath(path)
    if is_local(self.path):
      self._file = open(self.path, 'a', encoding='utf-8')
    else:
      self._file = None
      self._text = read_text(self.path) if exists(self.path) else ''

  def write(self, row: dict[str, Any]) -> None:
    line = json.dumps(row) + '\n'
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._text += line
      write_text(self.path, self._text)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class _EpathRecordWriter:
  """A tensorboardX record writer for remote paths: buffers the event file and uploads it whole
  on every flush (as tensorboardX's own GCS writer does, without google-cloud-storage)."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    epath.Path(self.path).write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathRecordWriterFactory:

  def open(self, path: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    makedirs(path)


def tensorboard_writer(logdir: str):
  """A tensorboardX SummaryWriter into `logdir`, local or remote."""
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  scheme = os.fspath(logdir).split('://')[0] if not is_local(logdir) else None
  if scheme:
    record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())
  return SummaryWriter(os.fspath(logdir))
