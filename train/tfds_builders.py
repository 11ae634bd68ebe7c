"""TF-free TFDS builders for mnist, fashion_mnist and tiny_shakespeare, and `prepare`.

The stock TFDS builders of these datasets need TensorFlow to *prepare* them (the gzip
extractor, `tf.io.gfile`, `tf.image.encode_png`), although writing and reading ArrayRecord
does not. The builders below subclass the stock ones, keeping their name, version,
features, splits and registered checksums, and replace only the TF-using parts: gzip is read
with Python and images are handed to `tfds.features.Image` as PIL-encoded PNG bytes. The
prepared data_dir is then read by the stock reader (`tfds.data_source(name)`), no custom
code needed.

Raw files come either from a local `raw_dir` (TFDS's `manual_dir`: the download manager
picks `raw_dir/<file name>` and checks its size and sha256 against TFDS's registered
checksums) or from the network through the TFDS download manager.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from typing import Any, Iterator

from absl import logging
import numpy as np
import PIL.Image
import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.tiny_shakespeare import (
    tiny_shakespeare_dataset_builder as _ts,
)
from tensorflow_datasets.core.download import download_manager as _download_manager
from tensorflow_datasets.image_classification import mnist as _mnist

from train.errors import UserError

# Split -> (images file, labels file), in the raw IDX format (names as registered by TFDS).
_IDX = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def read_idx_gz(path: os.PathLike[str] | str) -> np.ndarray:
  """Reads a gzipped IDX file (the MNIST format).

  Args:
    path: a `*-idx{1,3}-ubyte.gz` file.

  Returns:
    uint8 array of the file's shape: [N, 28, 28] for images, [N] for labels.
  """
  with gzip.open(path, 'rb') as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  if zero != 0 or dtype_code != 0x08:  # 0x08 = uint8, the only type MNIST uses.
    raise UserError(f'{path} is not a uint8 IDX file (magic {data[:4].hex()}): '
                    'replace it with the original file.')
  shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _png(image: np.ndarray) -> bytes:
  """PNG bytes of a [28, 28] uint8 image (so that TFDS does not call tf.image.encode_png)."""
  buf = io.BytesIO()
  PIL.Image.fromarray(image, mode='L').save(buf, format='PNG')
  return buf.getvalue()


class _IdxNoTF:
  """Mixin: the stock MNIST-family builder without TensorFlow."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
      't10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in manual_dir.')

  def _split_generators(self, dl_manager):
    urls = {split: tuple(self.URL + f for f in files) for split, files in _IDX.items()}
    # `download` (never `download_and_extract`: the extractor needs TF, and with a shared
    # extract dir fashion_mnist would silently reuse mnist's extraction). With a manual_dir
    # it returns the manual_dir copies after checking them against the registered checksums.
    paths = dl_manager.download(urls)
    return {split: self._generate_examples(images, labels)
            for split, (images, labels) in paths.items()}

  def _generate_examples(self, images_path, labels_path) -> Iterator[tuple[int, dict[str, Any]]]:
    images = read_idx_gz(images_path)
    labels = read_idx_gz(labels_path)
    if images.shape[0] != labels.shape[0]:
      raise UserError(f'{images_path} has {images.shape[0]} images but {labels_path} has '
                      f'{labels.shape[0]} labels: replace them with the original files.')
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': _png(image), 'label': int(label)}


# Unregistered, so that `tfds.builder(name)` keeps returning the stock builder (which reads
# what these write: same name, version and features).
with tfds.core.registered.skip_registration():

  class MnistNoTF(_IdxNoTF, _mnist.MNIST):
    name = 'mnist'
    url_infos = _mnist.MNIST.url_infos

  class FashionMnistNoTF(_IdxNoTF, _mnist.FashionMNIST):
    name = 'fashion_mnist'
    url_infos = _mnist.FashionMNIST.url_infos

  class TinyShakespeareNoTF(_ts.Builder):
    name = 'tiny_shakespeare'
    url_infos = _ts.Builder.url_infos
    # The stock builder's README/CITATIONS (description, citation) live in its package.
    pkg_dir_path = _ts.Builder._get_pkg_dir_path()
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put input.txt in manual_dir.'

    def _split_generators(self, dl_manager):
      (url,) = self.url_infos
      text = dl_manager.download(url).read_text(encoding='utf-8')
      # Same 90/5/5 character split as the stock builder.
      i = int(len(text) * 0.9)
      train_text, text = text[:i], text[i:]
      i = int(len(text) * 0.5)
      validation_text, test_text = text[:i], text[i:]
      return {
          'train': self._generate_examples('train', train_text),
          'validation': self._generate_examples('validation', validation_text),
          'test': self._generate_examples('test', test_text),
      }


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    'mnist': MnistNoTF,
    'fashion_mnist': FashionMnistNoTF,
    'tiny_shakespeare': TinyShakespeareNoTF,
}


def raw_files(name: str) -> list[str]:
  """The raw file names `prepare(name, raw_dir=...)` expects (TFDS's registered names)."""
  if name not in BUILDERS:
    raise UserError(f'genlab cannot prepare dataset {name!r} without TensorFlow: use one of '
                    f'{sorted(BUILDERS)} or point --config.data.data_dir at a prepared data_dir.')
  return sorted(info.filename for info in BUILDERS[name].url_infos.values())


def _network_error(url: str) -> BaseException | None:
  """The error of one quick request to `url` (None if any server answered)."""
  try:
    # Honours HTTP(S)_PROXY like TFDS's own requests; any HTTP status means we are online.
    requests.head(url, timeout=10, allow_redirects=True).close()
  except requests.exceptions.RequestException as e:
    return e
  return None


def _offline_message(name: str, data_dir: Any, files: list[str], error: BaseException) -> str:
  return (f'Dataset {name} is not prepared in data_dir {data_dir} and cannot be downloaded '
          f'({type(error).__name__}): pass --config.data.raw_dir=DIR holding '
          f'{", ".join(files)}, or point --config.data.data_dir (or TFDS_DATA_DIR) at a '
          'prepared data_dir.')


def _is_offline_error(e: BaseException) -> bool:
  """Whether `e` (or what it wraps) is a failed network download."""
  while e is not None:
    if isinstance(e, (requests.exceptions.RequestException, ConnectionError,
                      tfds.download.DownloadError)):
      return True
    e = e.__cause__ or e.__context__
  return False


def prepare(name: str, data_dir: str | None = None, raw_dir: str | None = None) -> None:
  """Prepares TFDS dataset `name` in `data_dir` (ArrayRecord), without TensorFlow.

  Args:
    name: 'mnist', 'fashion_mnist' or 'tiny_shakespeare'.
    data_dir: TFDS data_dir to write `name/<version>/` into; None means TFDS's default
      ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
    raw_dir: directory holding the raw files (`raw_files(name)`), checked against TFDS's
      registered checksums; None downloads them through the TFDS download manager.

  Raises:
    UserError: unknown name, raw files missing or with a wrong checksum, or offline with no
      raw files.
  """
  files = raw_files(name)
  if raw_dir is not None:
    raw_dir = os.path.abspath(os.path.expanduser(raw_dir))
    # TFDS quietly falls back to the network for a file missing from manual_dir: say so here.
    missing = [f for f in files if not os.path.isfile(os.path.join(raw_dir, f))]
    if missing:
      raise UserError(f'--config.data.raw_dir={raw_dir} lacks {", ".join(missing)} for dataset '
                      f'{name}: put the raw files {", ".join(files)} there.')
  if data_dir is not None:
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  builder = BUILDERS[name](data_dir=data_dir, file_format='array_record')
  root = builder._data_dir_root  # pylint: disable=protected-access  # data_dir, resolved by TFDS
  source = f'raw files in {raw_dir}' if raw_dir else 'the network (TFDS download manager)'
  logging.warning('Preparing TFDS dataset %s %s in %s from %s.', name, builder.version,
               builder.data_dir, source)
  if raw_dir is None:
    # Offline, TFDS's downloader retries 10 times with exponential backoff: ~200 s before it
    # gives up. One quick request tells the same thing at once.
    error = _network_error(next(iter(builder.url_infos)))
    if error is not None:
      raise UserError(_offline_message(name, root, files, error))
  config = tfds.download.DownloadConfig(
      manual_dir=raw_dir,
      # The GCS copies are TFRecord and need TF; every URL here has a registered checksum.
      try_download_gcs=False, force_checksums_validation=True)
  try:
    builder.download_and_prepare(download_config=config)
  except _download_manager.NonMatchingChecksumError as e:
    bad = ', '.join(_checksum_culprits(e, files)) or 'a raw file'
    where = f'in --config.data.raw_dir={raw_dir}' if raw_dir else 'downloaded'
    raise UserError(f'Wrong checksum for {bad} {where} (dataset {name}): replace it with the '
                    "original file (its size and sha256 must match TFDS's registered ones).") from e
  except Exception as e:  # pylint: disable=broad-except
    if raw_dir is None and _is_offline_error(e):
      raise UserError(_offline_message(name, root, files, e)) from e
    raise
  logging.warning('Prepared TFDS dataset %s in %s.', name, builder.data_dir)


def _checksum_culprits(e: BaseException, files: list[str]) -> list[str]:
  """Names of the raw files a NonMatchingChecksumError is about (its message holds the path)."""
  text = str(e)
  return [f for f in files if f in text]
