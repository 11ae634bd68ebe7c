"""Text data shared by the transformer families: a subword tokenizer and the Multi30k corpus.

Tokenizer: byte-level BPE trained with the `tokenizers` library (the GPT-2 scheme: text is
NFC-normalised, split into words and punctuation by GPT-2's regex with the preceding space kept
on the word, and every UTF-8 byte is a base symbol). So there is no out-of-vocabulary character
and `decode(encode(s)) == unicodedata.normalize('NFC', s)` for every string `s` (no lowercasing,
no whitespace collapsing); `[UNK]` exists for a stable id layout but byte-level BPE never emits
it. Special tokens have fixed ids, the same for every vocabulary size:

  [PAD]=0  [BOS]=1  [EOS]=2  [UNK]=3  [MASK]=4  [SEP]=5

`[MASK]` absorbs the space before it (`lstrip`), so "a [MASK] shirt" masks the token " red" of
"a red shirt" (byte-level tokens carry their leading space). Special tokens written in the text
are recognised as such. Training is deterministic: the same sentences and vocabulary size give
the same tokenizer file, byte for byte.

A run keeps its tokenizer as `tokenizer.json` (the library's own format) in the run directory,
so sampling and evaluation need no dataset (`save_in_workdir`, `load_from_workdir`).

Multi30k (task 1: English-German Flickr30k captions, Elliott et al. 2016) is read from its raw
gzipped files (`train.en.gz`, `val.de.gz`, `test_2016_flickr.en.gz`, ...; the file names of the
multi30k/dataset repository's data/task1/raw): from `--config.data.raw_dir` (the folder holding
them, or a folder with a `multi30k/` subfolder holding them), else from
`$GENLAB_RAW_DATA/multi30k`. Nothing downloads.
"""

from __future__ import annotations

import gzip
import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from train import storage
from train.errors import UserError

SPECIAL_TOKENS = ('[PAD]', '[BOS]', '[EOS]', '[UNK]', '[MASK]', '[SEP]')
PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID, SEP_ID = range(len(SPECIAL_TOKENS))
TOKENIZER_FILE = 'tokenizer.json'


class SubwordTokenizer:
  """Byte-level BPE over a `tokenizers.Tokenizer`, with the special ids above."""

  pad_id, bos_id, eos_id, unk_id, mask_id, sep_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID, SEP_ID

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    for i, token in enumerate(SPECIAL_TOKENS):
      if tokenizer.token_to_id(token) != i:
        raise ValueError(f'special token {token} has id {tokenizer.token_to_id(token)}, '
                         f'expected {i}')
    self._tok = tokenizer

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2
            ) -> SubwordTokenizer:
    """Trains byte-level BPE with `vocab_size` tokens (specials and the 256 bytes included)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
      raise ValueError(f'vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special '
                       'tokens and 256 bytes')
    tok = tokenizers.Tokenizer(models.BPE(unk_token='[UNK]'))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [tokenizers.AddedToken(t, special=True, lstrip=t == '[MASK]')
                for t in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return cls(tok)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    """[num_tokens] int32 ids of `text`; no BOS/EOS added."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text (the library encodes them in parallel)."""
    return [np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = True) -> str:
    """The text of `ids` (a flat sequence); special tokens are dropped unless `skip_special`
    is False."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=skip_special)

  def id_to_token(self, i: int) -> str | None:
    return self._tok.id_to_token(int(i))

  def to_str(self) -> str:
    return self._tok.to_str()

  @classmethod
  def from_str(cls, text: str) -> SubwordTokenizer:
    return cls(tokenizers.Tokenizer.from_str(text))

  def save(self, path: str) -> None:
    storage.write_text(path, self.to_str())

  @classmethod
  def load(cls, path: str) -> SubwordTokenizer:
    """The tokenizer saved at `path`; UserError when it is missing or damaged."""
    return _load(path, cls.from_str)

  def __repr__(self) -> str:
    return f'SubwordTokenizer(vocab_size={self.vocab_size})'


class PretrainedTokenizer(SubwordTokenizer):
  """A pretrained model's own `tokenizer.json` (e.g. GPT-2's byte-level BPE), used as is.

  Its special tokens are its own: only the one that ends a document, `eos_token` (GPT-2's
  `<|endoftext|>`), is used; the ids of `SubwordTokenizer`'s specials do not apply.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str):
    # pylint: disable=super-init-not-called (SubwordTokenizer's id checks do not apply)
    self._tok = tokenizer
    self.eos_token = eos_token
    self.eos_id = tokenizer.token_to_id(eos_token)
    if self.eos_id is None:
      raise ValueError(f'the tokenizer has no token {eos_token!r}')

  @classmethod
  def load(cls, path: str, eos_token: str) -> PretrainedTokenizer:
    """The tokenizer file at `path`; UserError when missing, damaged or without `eos_token`."""
    def parse(text):
      tok = tokenizers.Tokenizer.from_str(text)
      if tok.token_to_id(eos_token) is None:
        raise UserError(f'{path}: the tokenizer has no end-of-text token {eos_token!r}')
      return cls(tok, eos_token)
    return _load(path, parse)

  def __repr__(self) -> str:
    return f'PretrainedTokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})'


def read_tokenizer_file(path: str) -> tokenizers.Tokenizer:
  """The `tokenizers` file at `path`; UserError when it is missing or damaged."""
  return _load(path, tokenizers.Tokenizer.from_str)


def _load(path: str, parse):
  """parse(text of `path`); UserError when the file is missing or does not parse."""
  if not storage.isfile(path):
    raise UserError(f'{path}: tokenizer file missing (the run directory must hold the '
                    f'{TOKENIZER_FILE} that training wrote)')
  try:
    return parse(storage.read_text(path))
  except UserError:
    raise
  except Exception as e:  # the library raises a bare Exception on a malformed file
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f'{path}: damaged tokenizer file ({reason[:200]})') from None


def save_in_workdir(tokenizer: SubwordTokenizer, workdir: str) -> str:
  """Writes `workdir/tokenizer.json`; on a resumed run, checks that the tokenizer trained now is
  the one the run started with (a changed corpus or library would silently remap every id)."""
  path = storage.join(workdir, TOKENIZER_FILE)
  if storage.isfile(path):
    if storage.read_text(path) == tokenizer.to_str():
      return path
    raise UserError(f'{path}: differs from the tokenizer trained now (changed data, '
                    'vocab_size or tokenizers version?); the checkpoints need the old one: '
                    'restore the file or use a new --workdir')
  tokenizer.save(path)  # whole or not at all: a crash never leaves half a file
  return path


def load_from_workdir(workdir: str) -> SubwordTokenizer:
  """`workdir/tokenizer.json`; UserError naming the file when missing or damaged."""
  return SubwordTokenizer.load(storage.join(workdir, TOKENIZER_FILE))


# ---------------------------------------------------------------------------------------------
# Multi30k task 1, from the raw files.
# ---------------------------------------------------------------------------------------------
MULTI30K_SPLITS = {
    'train': 'train', 'val': 'val', 'test2016': 'test_2016_flickr',
    'test2017': 'test_2017_flickr', 'test2018': 'test_2018_flickr',
    'test2017_mscoco': 'test_2017_mscoco'}
MULTI30K_LANGUAGES = ('en', 'de')


def multi30k_dir(raw_dir: str | None) -> str:
  """The folder holding Multi30k's raw files: raw_dir (or raw_dir/multi30k), else
  $GENLAB_RAW_DATA/multi30k; UserError when none holds train.en.gz."""
  candidates = []
  if raw_dir:
    raw_dir = os.path.expanduser(raw_dir)
    candidates = [raw_dir, os.path.join(raw_dir, 'multi30k')]
    culprit = f'--config.data.raw_dir={raw_dir}'
  elif os.environ.get('GENLAB_RAW_DATA'):
    candidates = [os.path.join(os.environ['GENLAB_RAW_DATA'], 'multi30k')]
    culprit = f'GENLAB_RAW_DATA={os.environ["GENLAB_RAW_DATA"]}'
  else:
    raise UserError('Multi30k: set --config.data.raw_dir=DIR (holding train.en.gz, '
                    'val.de.gz, test_2016_flickr.en.gz, ...) or GENLAB_RAW_DATA=DIR with '
                    'DIR/multi30k/ holding them')
  for folder in candidates:
    if os.path.isfile(os.path.join(folder, 'train.en.gz')):
      return folder
  raise UserError(f'{culprit}: no Multi30k raw files there (expected train.en.gz in '
                  f'{" or ".join(candidates)})')


def load_multi30k(raw_dir: str | None, split: str, language: str) -> list[str]:
  """The sentences of one Multi30k split and language, one per line, in file order."""
  if split not in MULTI30K_SPLITS:
    raise UserError(f'split {split!r}: unknown Multi30k split (known: '
                    f'{", ".join(MULTI30K_SPLITS)})')
  if language not in MULTI30K_LANGUAGES:
    raise UserError(f'language {language!r}: Multi30k task 1 has {MULTI30K_LANGUAGES}')
  path = os.path.join(multi30k_dir(raw_dir), f'{MULTI30K_SPLITS[split]}.{language}.gz')
  if not os.path.isfile(path):
    raise UserError(f'{path}: missing Multi30k file for split {split!r}')
  try:
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      return f.read().splitlines()
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise UserError(f'{path}: cannot read it ({e})') from None


def load_multi30k_pairs(raw_dir: str | None, split: str, source: str, target: str
                        ) -> tuple[list[str], list[str]]:
  """(source sentences, target sentences) of `split`, aligned line by line."""
  src = load_multi30k(raw_dir, split, source)
  tgt = load_multi30k(raw_dir, split, target)
  if len(src) != len(tgt):
    raise UserError(f'Multi30k split {split!r}: {len(src)} {source} lines but {len(tgt)} '
                    f'{target} lines in {multi30k_dir(raw_dir)}')
  return src, tgt


# ---------------------------------------------------------------------------------------------
# Packed batches of sentence pairs.
# ---------------------------------------------------------------------------------------------
def pack_rows(src_lens: np.ndarray, tgt_lens: np.ndarray, order: np.ndarray, src_len: int,
              tgt_len: int, open_rows: int = 16) -> list[list[int]]:
  """Packs pairs into rows of `src_len` source and `tgt_len` target tokens.

  First fit over the last `open_rows` rows, taking the pairs in `order`: a pair goes into the
  oldest open row with room for both its sides, else opens a row (the oldest is closed when
  more than `open_rows` are open). A bounded window keeps each row's pairs close in `order`
  (so shuffling still mixes batches) and fills rows to ~98% on Multi30k.

  Returns:
    rows, each a list of pair indices, in the order they were closed.
  """
  rows: list[list[int]] = []
  live: list[list] = []  # [pair indices, source room, target room]
  for i in order:
    s, t = int(src_lens[i]), int(tgt_lens[i])
    for row in live:
      if row[1] >= s and row[2] >= t:
        row[0].append(int(i))
        row[1] -= s
        row[2] -= t
        break
    else:
      live.append([[int(i)], src_len - s, tgt_len - t])
      if len(live) > open_rows:
        rows.append(live.pop(0)[0])
  rows.extend(row[0] for row in live)
  return rows


class PackedPairs:
  """Batches of packed (source, target) pairs; the batch at a step is a pure function of it.

  Each pair is source + [EOS] on the encoder side and [BOS] + target (decoder input) /
  target + [EOS] (labels) on the decoder side; longer sides are cut to the row length (EOS kept
  last). Epoch e packs every pair in an order shuffled by (seed, e) (`pack_rows`) and yields
  floor(rows / batch_rows) batches (the few leftover rows wait for another epoch's shuffle);
  step -> epoch is found from those counts, so any step is produced directly and a resumed run
  sees exactly the batches an uninterrupted one would. Each process takes its contiguous slice
  of the global batch rows.

  Batch (this process's rows): 'src', 'src_seg', 'src_pos' int32 [rows, src_len] and 'tgt_in',
  'tgt_out', 'tgt_seg', 'tgt_pos' int32 [rows, tgt_len]; segment ids count 1, 2, ... per row
  (0 = padding) and positions restart at 0 in each segment.
  """

  def __init__(self, src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], *, src_len: int,
               tgt_len: int, batch_rows: int, seed: int, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1):
    if len(src) != len(tgt) or not len(src):
      raise UserError(f'PackedPairs needs as many targets as sources, got {len(src)} and '
                      f'{len(tgt)}')
    if batch_rows < 1 or batch_rows % process_count:
      raise UserError(f'batch_size={batch_rows} (rows) must be a positive multiple of the '
                      f'process count {process_count}: change --config.batch_size')
    if min(src_len, tgt_len) < 2:
      raise UserError(f'row lengths {src_len}, {tgt_len} must be >= 2: raise '
                      '--config.model.max_len')
    self.src = [np.append(s[:src_len - 1], EOS_ID).astype(np.int32) for s in src]
    self.tgt = [np.asarray(t[:tgt_len - 1], np.int32) for t in tgt]
    self.src_len, self.tgt_len = src_len, tgt_len
    self.batch_rows = batch_rows
    self.local_rows = batch_rows // process_count
    self.process_index = process_index
    self.seed, self.shuffle = seed, shuffle
    self._src_lens = np.asarray([len(s) for s in self.src])
    self._tgt_lens = np.asarray([len(t) + 1 for t in self.tgt])
    self._epochs: dict[int, list[list[int]]] = {}
    self._first_step = [0]  # first step of epoch e, extended as epochs are packed

  def epoch_rows(self, epoch: int) -> list[list[int]]:
    if epoch not in self._epochs:
      if len(self._epochs) > 2:
        self._epochs.pop(min(self._epochs))
      n = len(self.src)
      order = (np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle
               else np.arange(n))
      self._epochs[epoch] = pack_rows(self._src_lens, self._tgt_lens, order, self.src_len,
                                      self.tgt_len)
    return self._epochs[epoch]

  def steps_per_epoch(self, epoch: int) -> int:
    return len(self.epoch_rows(epoch)) // self.batch_rows

  def locate(self, step: int) -> tuple[int, int]:
    """(epoch, batch index within it) of `step`."""
    if step < 0:
      raise UserError(f'step={step} must be non-negative')
    while self._first_step[-1] <= step:
      epoch = len(self._first_step) - 1
      steps = self.steps_per_epoch(epoch)
      if steps < 1:
        raise UserError(f'batch_size={self.batch_rows} rows exceeds the '
                        f'{len(self.epoch_rows(epoch))} packed rows of the data: lower it')
      self._first_step.append(self._first_step[-1] + steps)
    epoch = int(np.searchsorted(self._first_step, step, side='right')) - 1
    return epoch, step - self._first_step[epoch]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    epoch, index = self.locate(step)
    lo = index * self.batch_rows + self.process_index * self.local_rows
    return self.make_rows(self.epoch_rows(epoch)[lo:lo + self.local_rows])

  def all_batches(self) -> list[dict[str, np.ndarray]]:
    """Every row of epoch 0 in batches (evaluation); the last batch is filled up with empty
    (all padding) rows."""
    rows = self.epoch_rows(0)
    out = []
    for lo in range(0, len(rows), self.batch_rows):
      chunk = rows[lo:lo + self.batch_rows]
      chunk = chunk + [[]] * (self.batch_rows - len(chunk))
      start = self.process_index * self.local_rows
      out.append(self.make_rows(chunk[start:start + self.local_rows]))
    return out

  def make_rows(self, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    n = len(rows)
    out = {k: np.zeros((n, self.src_len), np.int32) for k in ('src', 'src_seg', 'src_pos')}
    out.update({k: np.zeros((n, self.tgt_len), np.int32)
                for k in ('tgt_in', 'tgt_out', 'tgt_seg', 'tgt_pos')})
    for r, pairs in enumerate(rows):
      s_at = t_at = 0
      for seg, i in enumerate(pairs, start=1):
        s, t = self.src[i], self.tgt[i]
        out['src'][r, s_at:s_at + len(s)] = s
        out['src_seg'][r, s_at:s_at + len(s)] = seg
        out['src_pos'][r, s_at:s_at + len(s)] = np.arange(len(s))
        m = len(t) + 1
        out['tgt_in'][r, t_at] = BOS_ID
        out['tgt_in'][r, t_at + 1:t_at + m] = t
        out['tgt_out'][r, t_at:t_at + m - 1] = t
        out['tgt_out'][r, t_at + m - 1] = EOS_ID
        out['tgt_seg'][r, t_at:t_at + m] = seg
        out['tgt_pos'][r, t_at:t_at + m] = np.arange(m)
        s_at, t_at = s_at + len(s), t_at + m
    return out

  def real_tokens(self, epoch: int = 0) -> float:
    """Mean non-padding (source + target) tokens per global batch in `epoch`."""
    rows = self.epoch_rows(epoch)
    used = sum(int(self._src_lens[i] + self._tgt_lens[i]) for row in rows for i in row)
    return used / len(rows) * self.batch_rows
