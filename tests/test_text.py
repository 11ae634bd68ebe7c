"""Tests of train.text: the subword tokenizer and the Multi30k raw reader.

GENLAB_RAW_DATA: the folder holding multi30k/train.en.gz ... (CI: ../shared/data); the tests
that read Multi30k are skipped without it.
"""

import json
import os
import unicodedata

import pytest
import tokenizers

from train import text
from train.errors import UserError

_CORPUS = [
    'Two young, White males are outside near many bushes.',
    'Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.',
    'A little girl climbing into a wooden playhouse.',
    'Ein kleines Mädchen klettert in ein Spielhaus aus Holz.',
    'A man in an orange hat starring at something.',
    'Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.',
] * 20


@pytest.fixture(scope='module')
def tok():
  return text.SubwordTokenizer.train(_CORPUS, vocab_size=400)


@pytest.fixture(scope='session')
def multi30k_root():
  root = os.environ.get('GENLAB_RAW_DATA')
  if not root or not os.path.isfile(os.path.join(root, 'multi30k', 'train.en.gz')):
    pytest.skip('GENLAB_RAW_DATA is unset or lacks multi30k/train.en.gz')
  return root


def test_round_trip_is_nfc_identity(tok):
  # Unseen characters, CJK, emoji, tabs, repeated and edge spaces, a decomposed umlaut.
  samples = ['A man in an orange hat is smiling .', '  leading and trailing  ',
             'tab\tand\nnewline', '日本語 🙂 Ωmega', 'Mu\u0308ller', '', '[not special]',
             'x' * 300]
  for s in samples:
    assert tok.decode(tok.encode(s)) == unicodedata.normalize('NFC', s)
  batch = tok.encode_batch(samples)
  assert [b.tolist() for b in batch] == [tok.encode(s).tolist() for s in samples]


def test_special_token_ids_are_stable(tok):
  other = text.SubwordTokenizer.train(['completely different words here'] * 5 + _CORPUS[:2],
                                      vocab_size=300)
  for t in (tok, other):
    raw = tokenizers.Tokenizer.from_str(t.to_str())  # read back by the library itself
    assert [raw.token_to_id(s) for s in text.SPECIAL_TOKENS] == list(range(6))
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id, tok.sep_id) == (
      0, 1, 2, 3, 4, 5)
  # Specials written in the text are single tokens; [MASK] takes the space before it.
  ids = tok.encode('a [MASK] shirt [SEP] x').tolist()
  assert ids.count(4) == 1 and ids.count(5) == 1
  assert tok.decode(ids, skip_special=False).count('[MASK]') == 1
  assert tok.decode(tok.encode('a [MASK] b')) == 'a b'


def test_training_is_deterministic_and_sized(tok):
  again = text.SubwordTokenizer.train(_CORPUS, vocab_size=400)
  assert again.to_str() == tok.to_str()
  assert tok.vocab_size <= 400
  vocab = json.loads(tok.to_str())['model']['vocab']
  assert len(vocab) == tok.vocab_size


def test_save_load_and_bad_files(tok, tmp_path):
  path = text.save_in_workdir(tok, str(tmp_path))
  assert os.path.basename(path) == 'tokenizer.json'
  loaded = text.load_from_workdir(str(tmp_path))
  s = 'Ein Mann mit einem orangefarbenen Hut.'
  assert loaded.encode(s).tolist() == tok.encode(s).tolist()
  text.save_in_workdir(tok, str(tmp_path))  # the same tokenizer again (a resume): fine
  other = text.SubwordTokenizer.train(_CORPUS[:2], vocab_size=300)
  with pytest.raises(UserError, match='differs'):
    text.save_in_workdir(other, str(tmp_path))
  with open(path, 'w', encoding='utf-8') as f:
    f.write('{"version": "1.0", "model": ')  # truncated
  with pytest.raises(UserError, match='damaged tokenizer file') as e:
    text.load_from_workdir(str(tmp_path))
  assert '\n' not in str(e.value)
  os.remove(path)
  with pytest.raises(UserError, match='tokenizer file missing'):
    text.load_from_workdir(str(tmp_path))


def test_multi30k_reader(multi30k_root, tmp_path):
  en, de = text.load_multi30k_pairs(None, 'train', 'en', 'de')
  assert len(en) == len(de) == 29_000
  assert en[0] == 'Two young, White males are outside near many bushes.'
  assert de[0] == 'Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.'
  counts = {s: len(text.load_multi30k(None, s, 'de')) for s in ('val', 'test2016', 'test2017',
                                                                 'test2018')}
  assert counts == {'val': 1014, 'test2016': 1000, 'test2017': 1000, 'test2018': 1071}
  # raw_dir may name the multi30k folder or its parent.
  assert text.load_multi30k(os.path.join(multi30k_root, 'multi30k'), 'val', 'en')[:3] == (
      text.load_multi30k(multi30k_root, 'val', 'en')[:3])
  with pytest.raises(UserError, match="split 'test2019'"):
    text.load_multi30k(None, 'test2019', 'en')
  with pytest.raises(UserError, match='raw_dir'):
    text.load_multi30k(str(tmp_path), 'train', 'en')
