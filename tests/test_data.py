"""Tests of train.data and train.tfds_builders (TF-free TFDS data).

Env vars (relative paths are taken from the working directory):
  TFDS_DATA_DIR: a prepared TFDS data_dir holding tiny_shakespeare (CI: ../shared/data/tfds).
  GENLAB_RAW_DATA: the raw files, <dir>/tiny_shakespeare/input.txt (CI: ../shared/data).
No test can reach the network: the offline tests make DNS fail in-process.
"""

import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from train import data
from train import tfds_builders
from train.errors import UserError

_TRAIN_CHARS, _VAL_CHARS, _TEST_CHARS = 1_003_854, 55_770, 55_770
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env_dir(var: str) -> str | None:
  value = os.environ.get(var)
  return os.path.abspath(value) if value else None


@pytest.fixture(scope='session')
def raw_root():
  """GENLAB_RAW_DATA: the folder holding tiny_shakespeare/input.txt."""
  root = _env_dir('GENLAB_RAW_DATA')
  if not root:
    pytest.skip('GENLAB_RAW_DATA is unset (set it to the shared/data folder)')
  if not os.path.isfile(os.path.join(root, 'tiny_shakespeare', 'input.txt')):
    pytest.fail(f'GENLAB_RAW_DATA={root} lacks tiny_shakespeare/input.txt', pytrace=False)
  return root


@pytest.fixture(scope='session')
def data_dir():
  """TFDS_DATA_DIR: a prepared data_dir holding tiny_shakespeare."""
  path = _env_dir('TFDS_DATA_DIR')
  if not path:
    pytest.skip('TFDS_DATA_DIR is unset (set it to the prepared shared/data/tfds folder)')
  if not os.path.isdir(os.path.join(path, 'tiny_shakespeare')):
    pytest.fail(f'TFDS_DATA_DIR={path} lacks tiny_shakespeare', pytrace=False)
  return path


@pytest.fixture(scope='session')
def shakespeare(data_dir):
  return data.load_text('tiny_shakespeare', data_dir=data_dir)


@pytest.fixture
def offline(monkeypatch):
  """Makes every DNS lookup in this process fail at once, as on a machine with no network."""
  calls = []

  def no_dns(host, *args, **kwargs):
    calls.append(host)
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known (test: offline)')

  monkeypatch.setattr(socket, 'getaddrinfo', no_dns)
  return calls


def _assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
  message = str(error.value)
  assert '\n' not in message, message
  for part in parts:
    assert part in message, (part, message)
  return message


# ------------------------------------------------------------------------------- load_text


def test_load_text_splits_and_vocab(shakespeare):
  tokenizer, splits = shakespeare
  assert {k: v.shape for k, v in splits.items()} == {
      'train': (_TRAIN_CHARS,), 'validation': (_VAL_CHARS,), 'test': (_TEST_CHARS,)}
  assert all(v.dtype == np.int32 for v in splits.values())
  assert tokenizer.vocab_size == 65  # nanoGPT's shakespeare_char vocabulary.
  assert tokenizer.chars[:3] == '\n !' and tokenizer.chars[-1] == 'z'
  assert tokenizer.decode(splits['train'][:14]) == 'First Citizen:'
  # Every token id is used somewhere (the vocabulary is exactly the text's characters).
  used = np.unique(np.concatenate(list(splits.values())))
  np.testing.assert_array_equal(used, np.arange(65))


def test_load_text_matches_raw_file(shakespeare, raw_root):
  tokenizer, splits = shakespeare
  with open(os.path.join(raw_root, 'tiny_shakespeare', 'input.txt'), encoding='utf-8') as f:
    raw = f.read()
  decoded = ''.join(tokenizer.decode(splits[s]) for s in ('train', 'validation', 'test'))
  assert decoded == raw


def test_tokenizer_round_trip_and_json(shakespeare):
  tokenizer, _ = shakespeare
  text = 'ROMEO:\nBut, soft! what light through yonder window breaks?'
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids.tolist()) == text
  again = data.CharTokenizer.from_json(tokenizer.to_json())
  assert again == tokenizer and again.vocab_size == 65
  np.testing.assert_array_equal(again.encode(text), ids)
  assert tokenizer.encode('').shape == (0,) and tokenizer.decode([]) == ''


def test_tokenizer_unicode_and_errors():
  tokenizer = data.CharTokenizer.from_text('héllo wörld ✓')
  assert tokenizer.chars == ''.join(sorted(set('héllo wörld ✓')))
  assert tokenizer.decode(tokenizer.encode('wörld ✓')) == 'wörld ✓'
  for text, char in [('höllo!', '!'), ('\U0001F600', '\U0001F600'), ('a', 'a')]:
    with pytest.raises(UserError) as e:
      tokenizer.encode(text)
    _assert_one_line(e, repr(char))
  with pytest.raises(UserError) as e:
    tokenizer.decode([0, tokenizer.vocab_size])
  _assert_one_line(e, str(tokenizer.vocab_size))


# ---------------------------------------------------------------------------- TokenWindows


def test_token_windows_pure_function_of_seed_and_step(shakespeare):
  tokens = shakespeare[1]['train']
  make = lambda seed: data.TokenWindows(tokens, block_size=64, global_batch_size=12, seed=seed)
  a, b = make(0), make(0)
  for step in (0, 7, 123_456):  # any step, in any order, straight away
    x, y = a.batch(step), b.batch(step)
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
    np.testing.assert_array_equal(x['targets'], y['targets'])
  assert not np.array_equal(a.batch(0)['inputs'], a.batch(1)['inputs'])
  assert not np.array_equal(a.batch(0)['inputs'], make(1).batch(0)['inputs'])


def test_token_windows_targets_are_shifted_inputs(shakespeare):
  tokens = shakespeare[1]['train']
  windows = data.TokenWindows(tokens, block_size=32, global_batch_size=8, seed=3)
  batch = windows.batch(5)
  assert batch['inputs'].shape == batch['targets'].shape == (8, 32)
  assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
  for row, start in enumerate(windows.window_starts(5)):
    np.testing.assert_array_equal(batch['inputs'][row], tokens[start:start + 32])
    np.testing.assert_array_equal(batch['targets'][row], tokens[start + 1:start + 33])


def test_token_windows_process_slices_concatenate_to_global_batch(shakespeare):
  tokens = shakespeare[1]['train']
  kw = dict(block_size=16, global_batch_size=8, seed=11)
  whole = data.TokenWindows(tokens, **kw).batch(42)
  for count in (2, 4):
    parts = [data.TokenWindows(tokens, process_index=i, process_count=count, **kw).batch(42)
             for i in range(count)]
    for key in ('inputs', 'targets'):
      assert parts[0][key].shape == (8 // count, 16)
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_token_windows_cover_the_last_token():
  tokens = np.arange(10, dtype=np.int32)
  batch = data.TokenWindows(tokens, block_size=9, global_batch_size=4, seed=0).batch(0)
  # Only one window fits: it must use every token, the last one as the final target.
  np.testing.assert_array_equal(batch['inputs'], np.tile(np.arange(9), (4, 1)))
  np.testing.assert_array_equal(batch['targets'], np.tile(np.arange(1, 10), (4, 1)))


@pytest.mark.parametrize('kwargs, culprit', [
    (dict(block_size=10, global_batch_size=4), 'block_size=10'),
    (dict(block_size=100, global_batch_size=4), 'block_size=100'),
    (dict(block_size=4, global_batch_size=6, process_count=4), 'global_batch_size=6'),
    (dict(block_size=4, global_batch_size=8, process_index=2, process_count=2), 'process_index=2'),
])
def test_token_windows_bad_config(kwargs, culprit):
  with pytest.raises(UserError) as e:
    data.TokenWindows(np.arange(10), seed=0, **kwargs)
  _assert_one_line(e, culprit)


# ---------------------------------------------------------------------- prepare / load_source


def test_load_source_reads_prepared_data_without_preparing(data_dir, offline, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('prepare() called although the data is present')

  monkeypatch.setattr(tfds_builders, 'prepare', fail)
  source = data.load_source('tiny_shakespeare', data_dir=data_dir)
  assert sorted(source) == ['test', 'train', 'validation']
  assert len(source['train'][0]['text']) == _TRAIN_CHARS
  assert not offline  # no DNS lookup at all


def test_prepare_from_raw_files(tmp_path, raw_root, shakespeare, offline, caplog):
  raw_dir = os.path.join(raw_root, 'tiny_shakespeare')
  with caplog.at_level(logging.INFO):
    tokenizer, splits = data.load_text(data_dir=str(tmp_path), raw_dir=raw_dir)
  assert any('Preparing' in r.getMessage() and raw_dir in r.getMessage() for r in caplog.records)
  assert (tmp_path / 'tiny_shakespeare' / '1.0.0' / 'dataset_info.json').is_file()
  shared_tokenizer, shared_splits = shakespeare
  assert tokenizer == shared_tokenizer
  for split, tokens in shared_splits.items():
    assert tokenizer.decode(splits[split]) == shared_tokenizer.decode(tokens)
  assert not offline
  # Prepared now: a second load neither prepares nor needs raw files.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    data.load_text(data_dir=str(tmp_path))
  assert not any('Preparing' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize('where', ['empty', 'missing'])
def test_not_prepared_offline_is_one_line_user_error(tmp_path, offline, where):
  data_dir = tmp_path / 'data'
  if where == 'empty':
    data_dir.mkdir()
  start = time.monotonic()
  with pytest.raises(UserError) as e:
    data.load_source('tiny_shakespeare', data_dir=str(data_dir))
  assert time.monotonic() - start < 10  # TFDS's own retries would take ~200 s
  _assert_one_line(e, 'tiny_shakespeare', str(data_dir), '--config.data.raw_dir',
                   'input.txt', '--config.data.data_dir')
  assert offline  # it did try the network (and found none)
  assert where == 'empty' or not data_dir.exists()  # and left nothing behind
  assert where == 'missing' or not any(data_dir.iterdir())


def test_download_failure_inside_tfds_is_one_line_user_error(tmp_path, offline, monkeypatch):
  # Skip the quick probe so that TFDS's own download fails; no retries so that it is fast.
  from tensorflow_datasets.core.download import downloader
  monkeypatch.setattr(tfds_builders, '_network_error', lambda url: None)
  monkeypatch.setattr(downloader, 'MAX_RETRIES', 0)
  with pytest.raises(UserError) as e:
    tfds_builders.prepare('tiny_shakespeare', data_dir=str(tmp_path))
  _assert_one_line(e, '--config.data.raw_dir', 'input.txt')
  assert offline


def test_corrupted_raw_file_is_user_error_naming_it(tmp_path, raw_root, offline):
  raw_dir = tmp_path / 'raw'
  raw_dir.mkdir()
  content = bytearray((open(os.path.join(raw_root, 'tiny_shakespeare', 'input.txt'), 'rb')).read())
  content[1000] ^= 0x01  # same size, one bit off
  (raw_dir / 'input.txt').write_bytes(bytes(content))
  with pytest.raises(UserError) as e:
    tfds_builders.prepare('tiny_shakespeare', data_dir=str(tmp_path / 'data'),
                          raw_dir=str(raw_dir))
  _assert_one_line(e, 'input.txt', 'checksum', str(raw_dir))
  assert not offline


def test_missing_raw_file_is_user_error(tmp_path, offline):
  with pytest.raises(UserError) as e:
    tfds_builders.prepare('mnist', data_dir=str(tmp_path / 'data'), raw_dir=str(tmp_path))
  _assert_one_line(e, 'train-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', str(tmp_path))


def test_unknown_dataset_is_user_error(tmp_path, offline):
  with pytest.raises(UserError) as e:
    data.load_source('no_such_dataset', data_dir=str(tmp_path))
  _assert_one_line(e, 'no_such_dataset', 'tiny_shakespeare')
  with pytest.raises(UserError) as e:
    tfds_builders.prepare('cifar10', data_dir=str(tmp_path))
  _assert_one_line(e, 'cifar10')


def test_mnist_prepare_from_raw_files_matches_shared(tmp_path, raw_root, data_dir, offline):
  """Checks the image path (PNG via PIL) on a few records; preparing MNIST takes ~10 s."""
  if not os.path.isdir(os.path.join(data_dir, 'mnist')):
    pytest.skip(f'{data_dir} has no prepared mnist')
  raw_dir = os.path.join(raw_root, 'mnist')
  if not os.path.isdir(raw_dir):
    pytest.skip(f'{raw_root} has no mnist raw files')
  shared = data.load_source('mnist', data_dir=data_dir)
  ours = data.load_source('mnist', data_dir=str(tmp_path), raw_dir=raw_dir)
  assert {k: len(v) for k, v in ours.items()} == {'train': 60_000, 'test': 10_000}
  for split, i in [('train', 0), ('train', 59_999), ('test', 123)]:
    a, b = ours[split][i], shared[split][i]
    assert a['image'].shape == (28, 28, 1) and a['image'].dtype == np.uint8
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['label'] == b['label']


# ------------------------------------------------------------------------------ no TensorFlow


def test_reading_does_not_import_tensorflow(data_dir):
  code = textwrap.dedent(f"""
      import sys
      from train import data
      tokenizer, splits = data.load_text(data_dir={data_dir!r})
      assert len(splits['train']) == {_TRAIN_CHARS}
      data.TokenWindows(splits['train'], block_size=8, global_batch_size=2, seed=0).batch(0)
      assert 'tensorflow' not in sys.modules, 'tensorflow was imported'
      print('ok')
  """)
  env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  result = subprocess.run([sys.executable, '-c', code], cwd=_REPO, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]
