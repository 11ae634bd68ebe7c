"""Image data (whole splits in memory, step-indexed epochs), label parsing and sample grids."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import data as data_lib
from train import images as images_lib
from train.errors import UserError


def _toy(n=10):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
  return images, np.arange(n, dtype=np.int32)


def test_epochs_visit_every_example_once_and_any_step_is_direct():
  images, labels = _toy(10)
  batches = data_lib.ImageBatches(images, labels, global_batch_size=4, seed=3)
  seen = np.concatenate([batches.batch(s)['label'] for s in range(5)])  # 20 = 2 epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  assert not np.array_equal(seen[:10], seen[10:])  # each epoch has its own order
  fresh = data_lib.ImageBatches(images, labels, global_batch_size=4, seed=3)
  np.testing.assert_array_equal(fresh.batch(3)['label'], batches.batch(3)['label'])
  other = data_lib.ImageBatches(images, labels, global_batch_size=4, seed=4)
  assert not all(np.array_equal(other.batch(s)['label'], batches.batch(s)['label'])
                 for s in range(3))
  b = batches.batch(1)
  np.testing.assert_array_equal(b['image'][:, 0, 0, 0], b['label'])


def test_processes_take_contiguous_slices_of_the_same_global_batch():
  images, labels = _toy(10)
  whole = data_lib.ImageBatches(images, labels, global_batch_size=4, seed=0).batch(7)['label']
  parts = [data_lib.ImageBatches(images, labels, global_batch_size=4, seed=0, process_index=p,
                                 process_count=2).batch(7)['label'] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  with pytest.raises(UserError, match='multiple of the process count'):
    data_lib.ImageBatches(images, labels, global_batch_size=3, seed=0, process_count=2)


def test_fixed_batches_are_in_order_and_whole():
  images, labels = _toy(10)
  batches = data_lib.fixed_batches(images, labels, global_batch_size=4, num_batches=0)
  assert [list(b['label']) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  with pytest.raises(UserError, match='exceeds'):
    data_lib.fixed_batches(images, labels, global_batch_size=11, num_batches=1)


def test_parse_labels():
  assert images_lib.parse_labels(None, 4, 10) is None
  np.testing.assert_array_equal(images_lib.parse_labels('all', 12, 10), list(range(10)) + [0, 1])
  np.testing.assert_array_equal(images_lib.parse_labels('1,7', 3, 10), [1, 7, 1])
  with pytest.raises(UserError, match='label 10 is outside the classes 0..9'):
    images_lib.parse_labels('3,10', 4, 10)
  with pytest.raises(UserError, match='unconditional'):
    images_lib.parse_labels('3', 4, 0)
  with pytest.raises(UserError, match='comma-separated'):
    images_lib.parse_labels('three', 4, 10)


def test_grid_tiles_images_and_round_trips_pixels(tmp_path):
  x = np.linspace(-1, 1, 6 * 5 * 5).reshape(6, 5, 5, 1)
  u8 = images_lib.to_uint8(x)
  np.testing.assert_allclose(images_lib.to_float(u8), x, atol=1 / 127.5)
  path = images_lib.save_grid(str(tmp_path / 'g'), u8, labels=list('abcdef'), ncols=3)
  assert os.path.exists(path) and path.endswith('.png')
  grid = np.asarray(images_lib.image_grid(u8, ncols=3))[..., 0]
  np.testing.assert_array_equal(grid[2:7, 2:7], u8[0, ..., 0])           # tile (0, 0)
  np.testing.assert_array_equal(grid[9:14, 9:14], u8[4, ..., 0])         # tile (1, 1)


@pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'), reason='needs TFDS_DATA_DIR with mnist')
def test_load_mnist():
  ds = data_lib.load_images('mnist')
  images, labels = ds['train']
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                                          5949]
  assert ds['test'][0].shape == (10000, 28, 28, 1)
  assert ds.class_names == [str(i) for i in range(10)]
  with pytest.raises(UserError, match='no "image"/"label" features'):
    data_lib.load_images('tiny_shakespeare')


@pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'), reason='needs TFDS_DATA_DIR with mnist')
def test_decoded_images_are_read_back_from_the_cache_dir(tmp_path, monkeypatch):
  decoded = data_lib.load_images('mnist')   # this process's copy
  monkeypatch.setenv(data_lib.CACHE_DIR_VARIABLE, str(tmp_path))
  monkeypatch.setattr(data_lib, '_IMAGE_CACHE', {})
  path = data_lib._decoded_cache_file('mnist', tfds.builder('mnist').data_dir)
  assert os.path.dirname(path) == str(tmp_path)
  data_lib._write_decoded(path, decoded)

  def no_decoding(encoded):
    raise AssertionError('decoded a PNG although the cache holds the dataset')
  monkeypatch.setattr(data_lib, '_decode_png', no_decoding)
  cached = data_lib.load_images('mnist')
  assert sorted(cached) == sorted(decoded) == ['test', 'train']
  assert cached.class_names == decoded.class_names
  for split in cached:
    for ours, theirs in zip(cached[split], decoded[split]):
      assert ours.dtype == theirs.dtype
      np.testing.assert_array_equal(ours, theirs)
  # The reference: TFDS's own decoding of the first test records.
  reference = data_lib.load_source('mnist')['test']
  np.testing.assert_array_equal(cached['test'][0][:20, ..., 0],
                                np.stack([reference[i]['image'][..., 0] for i in range(20)]))

  # An unreadable cache file is decoded again, not an error.
  with open(path, 'wb') as f:
    f.write(b'not an npz')
  monkeypatch.setattr(data_lib, '_IMAGE_CACHE', {})
  with pytest.raises(AssertionError, match='decoded a PNG'):
    data_lib.load_images('mnist')


def test_decoded_image_cache_follows_the_prepared_files(tmp_path, monkeypatch):
  prepared = tmp_path / 'mnist' / '3.0.1'
  prepared.mkdir(parents=True)
  (prepared / 'mnist-train.array_record-00000-of-00001').write_bytes(b'x' * 10)
  cache = tmp_path / 'cache'
  monkeypatch.delenv(data_lib.CACHE_DIR_VARIABLE, raising=False)
  assert data_lib._decoded_cache_file('mnist', str(prepared)) is None   # no cache asked for
  monkeypatch.setenv(data_lib.CACHE_DIR_VARIABLE, str(cache))
  with pytest.raises(UserError, match=f'GENLAB_CACHE_DIR={cache}: no such directory'):
    data_lib._decoded_cache_file('mnist', str(prepared))
  cache.mkdir()
  first = data_lib._decoded_cache_file('mnist', str(prepared))
  assert first == data_lib._decoded_cache_file('mnist', str(prepared))
  assert os.path.basename(first).startswith('mnist-3.0.1-') and first.endswith('.npz')
  (prepared / 'mnist-train.array_record-00000-of-00001').write_bytes(b'y' * 11)   # re-prepared
  assert data_lib._decoded_cache_file('mnist', str(prepared)) != first
  assert data_lib._decoded_cache_file('mnist', 'gs://bucket/mnist/3.0.1') is None


def test_images_decode_like_tfds_without_its_opencv_warning(capfd):
  # Reads the test split directly (load_images caches per process, and TFDS warns only once).
  source = data_lib.load_source('mnist', decoders={'image': tfds.decode.SkipDecoding()})['test']
  ours = np.stack([data_lib._decode_png(source[i]['image']) for i in range(50)])[..., None]
  assert 'OpenCV' not in capfd.readouterr().err
  # The reference: TFDS's own decoding of the same records.
  reference = data_lib.load_source('mnist')['test']
  theirs = np.stack([reference[i]['image'] for i in range(50)])
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(data_lib.load_images('mnist')['test'][0][:50], theirs)
