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
    with open(path, 'w', encoding='utf-8') as f:
      f.write(self.to_str())

  @classmethod
  def load(cls, path: str) -> SubwordTokenizer:
    """The tokenizer saved at `path`; UserError when it is missing or damaged."""
    if not os.path.isfile(path):
      raise UserError(f'{path}: tokenizer file missing (the run directory must hold the '
                      f'{TOKENIZER_FILE} that training wrote)')
    try:
      with open(path, encoding='utf-8') as f:
        return cls.from_str(f.read())
    except Exception as e:  # the library raises a bare Exception on a malformed file
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f'{path}: damaged tokenizer file ({reason[:200]})') from None

  def __repr__(self) -> str:
    return f'SubwordTokenizer(vocab_size={self.vocab_size})'


def save_in_workdir(tokenizer: SubwordTokenizer, workdir: str) -> str:
  """Writes `workdir/tokenizer.json`; on a resumed run, checks that the tokenizer trained now is
  the one the run started with (a changed corpus or library would silently remap every id)."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      if f.read() == tokenizer.to_str():
        return path
    raise UserError(f'{path}: differs from the tokenizer trained now (changed data, '
                    'vocab_size or tokenizers version?); the checkpoints need the old one: '
                    'restore the file or use a new --workdir')
  tmp = path + '.tmp'
  tokenizer.save(tmp)
  os.replace(tmp, path)  # atomic: a crash never leaves half a file
  return path


def load_from_workdir(workdir: str) -> SubwordTokenizer:
  """`workdir/tokenizer.json`; UserError naming the file when missing or damaged."""
  return SubwordTokenizer.load(os.path.join(workdir, TOKENIZER_FILE))


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
