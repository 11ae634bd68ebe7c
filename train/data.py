"""Data without TensorFlow: TFDS ArrayRecord sources, a char tokenizer and token windows.

Datasets are read with `tfds.data_source` (ArrayRecord, random access: no TensorFlow). A
dataset missing from the data_dir is prepared on first use by the TF-free builders of
`train.tfds_builders`, from raw files (`raw_dir`) or from the network.

Batches of `TokenWindows` are a pure function of (seed, step): any step can be produced
directly, so a resumed run sees exactly the batches an uninterrupted run would, with no
iterator state to checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Sequence
import zipfile

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from train import tfds_builders
from train.errors import UserError


def load_source(name: str, data_dir: str | None = None, raw_dir: str | None = None,
                decoders: dict[str, Any] | None = None) -> dict[str, Sequence[Any]]:
  """The splits of TFDS dataset `name`, as random-access sources.

  Args:
    name: TFDS name, e.g. 'mnist', 'fashion_mnist', 'tiny_shakespeare'.
    data_dir: TFDS data_dir; None means TFDS's default ($TFDS_DATA_DIR, read when
      tensorflow_datasets is imported, else ~/tensorflow_datasets).
    raw_dir: raw files to prepare the dataset from if it is not in data_dir yet (see
      `tfds_builders.prepare`); None downloads them.
    decoders: per-feature TFDS decoders, e.g. {'image': tfds.decode.SkipDecoding()}; those
      naming a feature the dataset lacks are left out.

  Returns:
    split name -> `tfds.data_source` of that split (len() and [i] -> dict of numpy/bytes).

  Raises:
    UserError: unknown dataset, or not prepared and it cannot be prepared.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f'Unknown TFDS dataset {name!r} (--config.data.name): use one of '
                    f'{sorted(tfds_builders.BUILDERS)} or another TFDS name.') from e
  if not builder.is_prepared():
    # Not `tfds.data_source(download=True)`: that prepares with the stock builder, which
    # needs TensorFlow, and its error on a missing dataset wrongly blames the file format.
    tfds_builders.prepare(name, data_dir=data_dir, raw_dir=raw_dir)
    builder = tfds.builder(name, data_dir=data_dir)
  else:
    logging.info('Reading TFDS dataset %s from %s.', name, builder.data_dir)
  if decoders:  # only for features the dataset has: TFDS rejects the others
    decoders = {k: v for k, v in decoders.items() if k in builder.info.features} or None
  return builder.as_data_source(decoders=decoders)


class CharTokenizer:
  """nanoGPT's character-level tokenizer: token id = rank of the character in `chars`."""

  def __init__(self, chars: str):
    """Args: chars: the vocabulary, distinct characters in increasing order."""
    if not chars or list(chars) != sorted(set(chars)):
      raise UserError(f'CharTokenizer vocabulary {chars[:40]!r} must be non-empty, sorted '
                      'and without repeats: build it with CharTokenizer.from_text(text).')
    self.chars = chars
    # Code points in increasing order: encoding is a binary search, decoding a gather.
    self._codes = _code_points(chars)

  @classmethod
  def from_text(cls, text: str) -> CharTokenizer:
    """The vocabulary of `text` (as nanoGPT's prepare.py: sorted set of its characters)."""
    return cls(''.join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Returns the [len(text)] int32 token ids of `text`."""
    codes = _code_points(text)
    ids = np.searchsorted(self._codes, codes).astype(np.int32)
    bad = (ids >= len(self._codes)) | (self._codes[np.minimum(ids, len(self._codes) - 1)] != codes)
    if bad.any():
      char = chr(codes[np.argmax(bad)])
      raise UserError(f'Character {char!r} (U+{ord(char):04X}) is not in the tokenizer '
                      'vocabulary: encode text from the training data or rebuild the vocab.')
    return ids

  def decode(self, ids: np.ndarray | Sequence[int]) -> str:
    """Returns the text of token ids (any shape is flattened)."""
    ids = np.asarray(ids).reshape(-1)
    if not ids.size:
      return ''
    if not np.issubdtype(ids.dtype, np.integer):
      raise UserError(f'CharTokenizer.decode got {ids.dtype} ids: pass integer token ids.')
    if ids.min() < 0 or ids.max() >= self.vocab_size:
      raise UserError(f'Token id {int(ids.min() if ids.min() < 0 else ids.max())} is outside '
                      f'the vocabulary [0, {self.vocab_size}): decode ids of this tokenizer.')
    return self._codes[ids].astype('<u4').tobytes().decode('utf-32-le')

  def to_json(self) -> str:
    return json.dumps({'chars': self.chars})

  @classmethod
  def from_json(cls, text: str) -> CharTokenizer:
    return cls(json.loads(text)['chars'])

  def __eq__(self, other: object) -> bool:
    return isinstance(other, CharTokenizer) and other.chars == self.chars

  def __repr__(self) -> str:
    return f'CharTokenizer(vocab_size={self.vocab_size})'


def _code_points(text: str) -> np.ndarray:
  """[len(text)] uint32 Unicode code points (vectorised, ~1 ms per million characters)."""
  return np.frombuffer(text.encode('utf-32-le'), dtype='<u4')


def load_text(name: str = 'tiny_shakespeare', data_dir: str | None = None,
              raw_dir: str | None = None) -> tuple[CharTokenizer, dict[str, np.ndarray]]:
  """A character-level text dataset, tokenized as nanoGPT does.

  Args:
    name: a TFDS text dataset with a 'text' feature (each split's examples are joined).
    data_dir: TFDS data_dir (see `load_source`).
    raw_dir: raw files to prepare it from if needed (see `load_source`).

  Returns:
    (tokenizer over the characters of ALL splits, split -> [num_chars] int32 token ids).
  """
  source = load_source(name, data_dir=data_dir, raw_dir=raw_dir)
  texts = {}
  for split, examples in source.items():
    if len(examples) and 'text' not in examples[0]:
      raise UserError(f'Dataset {name} has no "text" feature (it has {sorted(examples[0])}): '
                      'use a text dataset such as tiny_shakespeare.')
    texts[split] = ''.join(_as_str(examples[i]['text']) for i in range(len(examples)))
  # nanoGPT builds the vocabulary from the whole text, before splitting.
  tokenizer = CharTokenizer.from_text(''.join(texts.values()))
  return tokenizer, {split: tokenizer.encode(text) for split, text in texts.items()}


def _as_str(text: bytes | str) -> str:
  return text.decode('utf-8') if isinstance(text, bytes) else text  # data_source gives bytes


class TokenWindows:
  """Random windows of block_size+1 tokens; the batch at a step is a pure function of (seed, step).

  As nanoGPT's get_batch: window starts are uniform over [0, len(tokens) - block_size), drawn
  with replacement. The global batch depends only on (tokens, block_size, global_batch_size,
  seed, step); each process takes its contiguous slice, so the global batch is the same
  whatever the process count.
  """

  def __init__(self, tokens: np.ndarray, *, block_size: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    """Args:
      tokens: [num_tokens] token ids.
      block_size: model context length; each window has block_size + 1 tokens.
      global_batch_size: windows per step over all processes.
      seed: non-negative data seed.
      process_index: this process, in [0, process_count).
      process_count: number of processes sharing the global batch.
    """
    self.tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    if block_size < 1 or block_size >= len(self.tokens):
      raise UserError(f'block_size={block_size} must be in [1, {len(self.tokens)}) (the number '
                      'of tokens in the split): lower --config.model.block_size.')
    if global_batch_size < 1 or global_batch_size % process_count:
      raise UserError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                      f'the process count {process_count}: change --config.batch_size.')
    if not 0 <= process_index < process_count:
      raise UserError(f'process_index={process_index} must be in [0, {process_count}).')
    if seed < 0:
      raise UserError(f'seed={seed} must be non-negative: change --config.seed.')
    self.block_size = block_size
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self._offsets = np.arange(block_size + 1)

  def window_starts(self, step: int) -> np.ndarray:
    """[global_batch_size] int64 start of every window of the global batch at `step`."""
    if step < 0:
      raise UserError(f'step={step} must be non-negative.')
    # A fresh generator keyed by (seed, step): no state, so any step can be produced directly.
    rng = np.random.default_rng((self.seed, step))
    return rng.integers(0, len(self.tokens) - self.block_size, size=self.global_batch_size)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's batch at `step`.

    Returns:
      {'inputs': [local_batch, block_size] int32, 'targets': [local_batch, block_size] int32},
      targets being inputs shifted by one token.
    """
    lo = self.process_index * self.local_batch_size
    starts = self.window_starts(step)[lo:lo + self.local_batch_size]
    windows = self.tokens[starts[:, None] + self._offsets]  # [local_batch, block_size + 1]
    return {'inputs': np.ascontiguousarray(windows[:, :-1]),
            'targets': np.ascontiguousarray(windows[:, 1:])}


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
_IMAGE_CACHE: dict[tuple[Any, ...], Any] = {}


class ImageDataset(dict):
  """split -> (uint8 [N, H, W, C] images, int32 [N] labels), with the dataset's `class_names`."""
  class_names: list[str]


def load_images(name: str, data_dir: str | None = None,
                raw_dir: str | None = None) -> ImageDataset:
  """Every split of a TFDS image classification dataset, decoded into memory.

  Small datasets (MNIST, Fashion-MNIST, CIFAR-10) fit in host memory; decoding once (seconds
  for MNIST's 70k PNGs) makes every later batch a cheap gather. Results are
  cached per process and, where $GENLAB_CACHE_DIR names a directory, across processes: the
  decoded arrays are kept there in one .npz per dataset version, keyed by the names, sizes and
  modification times of the prepared files they come from (a changed dataset is decoded again).

  Args:
    name: TFDS name with 'image' and 'label' features ('mnist', 'fashion_mnist', 'cifar10').
    data_dir, raw_dir: see `load_source`.
  """
  key = (name, data_dir, raw_dir, tfds.core.constants.DATA_DIR)
  if key in _IMAGE_CACHE:
    return _IMAGE_CACHE[key]
  # The PNG bytes are decoded here with Pillow: TFDS's own numpy decoding would do the same
  # but first logs a warning, in every command, that OpenCV is not installed.
  source = load_source(name, data_dir=data_dir, raw_dir=raw_dir,
                       decoders={'image': tfds.decode.SkipDecoding()})
  builder = tfds.builder(name, data_dir=data_dir)
  cache_file = _decoded_cache_file(name, builder.data_dir)
  out = _read_decoded(cache_file) if cache_file else None
  if out is None:
    out = ImageDataset()
    for split, examples in source.items():
      if not len(examples):
        continue
      first = examples[0]
      if 'image' not in first or 'label' not in first:
        raise UserError(f'Dataset {name} has no "image"/"label" features (it has '
                        f'{sorted(first)}): use an image classification dataset such as mnist '
                        'or fashion_mnist.')
      items = examples.__getitems__(list(range(len(examples))))
      images = np.stack([_decode_png(ex['image']) for ex in items])
      if images.ndim == 3:
        images = images[..., None]
      labels = np.asarray([ex['label'] for ex in items], np.int32)
      out[split] = (images, labels)
    if cache_file:
      _write_decoded(cache_file, out)
  out.class_names = list(builder.info.features['label'].names)
  _IMAGE_CACHE[key] = out
  return out


CACHE_DIR_VARIABLE = 'GENLAB_CACHE_DIR'


def _decoded_cache_file(name: str, prepared_dir: str) -> str | None:
  """$GENLAB_CACHE_DIR/<name>-<version>-<fingerprint>.npz, or None without a local cache."""
  cache_dir = os.environ.get(CACHE_DIR_VARIABLE)
  if not cache_dir or not os.path.isdir(str(prepared_dir)):
    return None  # no cache asked for, or the data is not on a local disk (gs://...)
  if not os.path.isdir(cache_dir):
    raise UserError(f'{CACHE_DIR_VARIABLE}={cache_dir}: no such directory; create it, or unset '
                    'the variable to decode datasets in every process.')
  files = sorted(os.scandir(prepared_dir), key=lambda e: e.name)
  stamp = [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in files if e.is_file()]
  digest = hashlib.sha256(json.dumps([os.path.abspath(prepared_dir), stamp]).encode())
  version = os.path.basename(os.path.normpath(str(prepared_dir)))
  return os.path.join(cache_dir, f'{name}-{version}-{digest.hexdigest()[:16]}.npz')


def _read_decoded(path: str) -> ImageDataset | None:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as arrays:
      out = ImageDataset()
      for key in arrays.files:
        if key.endswith('/images'):
          split = key[:-len('/images')]
          out[split] = (arrays[key], arrays[f'{split}/labels'])
    return out
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    logging.warning('Decoded-image cache %s is unreadable (%s): decoding the dataset again.',
                    path, e)
    return None


def _write_decoded(path: str, dataset: ImageDataset) -> None:
  """Writes to a temporary name, then renames: readers see a whole file or none."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, **{f'{split}/{field}': array for split, arrays in dataset.items()
                     for field, array in zip(('images', 'labels'), arrays)})
    os.replace(tmp, path)
  except OSError as e:  # a full or read-only cache directory costs only the cache
    logging.warning('Could not write the decoded-image cache %s: %s', path, e)
    if os.path.exists(tmp):
      os.remove(tmp)


def _decode_png(encoded: bytes) -> np.ndarray:
  """An encoded image (PNG bytes, as TFDS stores them) -> uint8 [H, W] or [H, W, C]."""
  with Image.open(io.BytesIO(encoded)) as image:
    return np.asarray(image, np.uint8)


class ImageBatches:
  """Shuffled epochs of (image, label) examples; the batch at a step is a pure function of it.

  Example k of the stream (k = step * global_batch_size + i) is example perm_e[k mod N] of
  epoch e = k // N, where perm_e is a permutation keyed by (seed, e): every epoch visits every
  example once, and any step is produced directly (resume needs no iterator state). Each
  process takes its contiguous slice of the global batch.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, global_batch_size: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    if len(images) != len(labels) or not len(images):
      raise UserError(f'ImageBatches needs as many labels as images, got {len(images)} images '
                      f'and {len(labels)} labels.')
    if global_batch_size < 1 or global_batch_size % process_count:
      raise UserError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                      f'the process count {process_count}: change --config.batch_size.')
    if seed < 0:
      raise UserError(f'seed={seed} must be non-negative: change --config.seed.')
    self.images, self.labels = images, labels
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.clear()
      self._perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(len(self.images))
    return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    """[global_batch_size] dataset indices of the global batch at `step`."""
    if step < 0:
      raise UserError(f'step={step} must be non-negative.')
    n = len(self.images)
    k = step * self.global_batch_size + np.arange(self.global_batch_size)
    epochs, pos = np.divmod(k, n)
    out = np.empty_like(k)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._perm(int(e))[pos[sel]]
    return out

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's {'image': uint8 [b, H, W, C], 'label': int32 [b]} at `step`."""
    lo = self.process_index * self.local_batch_size
    idx = self.indices(step)[lo:lo + self.local_batch_size]
    return {'image': self.images[idx], 'label': self.labels[idx]}


def fixed_batches(images: np.ndarray, labels: np.ndarray, *, global_batch_size: int,
                  num_batches: int, process_index: int = 0, process_count: int = 1
                  ) -> list[dict[str, np.ndarray]]:
  """The first num_batches * global_batch_size examples in order (evaluation), this process's
  slice of each batch. num_batches <= 0 means as many whole batches as the split holds."""
  full = len(images) // global_batch_size
  num_batches = full if num_batches <= 0 else min(num_batches, full)
  if num_batches < 1:
    raise UserError(f'eval batch size {global_batch_size} exceeds the {len(images)} examples '
                    'of the evaluation split: lower --config.batch_size.')
  local = global_batch_size // process_count
  out = []
  for b in range(num_batches):
    lo = b * global_batch_size + process_index * local
    out.append({'image': images[lo:lo + local], 'label': labels[lo:lo + local]})
  return out
