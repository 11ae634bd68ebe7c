"""Captions: attributes measured on hand-built images, seeded phrasings, held-out combinations,
the caption tokenizer and its bad prompts (numpy only, no training)."""

import numpy as np
import pytest

from train import captions
from train import data as data_lib


def canvas(n=1):
  return np.zeros((n, 28, 28), np.uint8)


def bar(width, length=16, shear=0.0, value=255):
  """A uint8 [28, 28] stroke `width` pixels wide and `length` tall, centred; its column moves
  `shear` pixels right per pixel up."""
  img = canvas()[0]
  top = 14 - length // 2
  for i, row in enumerate(range(top, top + length)):
    up = (top + length - 1) - row  # 0 at the bottom row
    left = int(round(14 - width / 2 + shear * (up - (length - 1) / 2)))
    img[row, left:left + width] = value
  return img


def category(name, images, dataset='mnist'):
  words = captions.ATTRIBUTES[name]
  return [words[i] for i in captions.measure(np.stack(images), dataset)[name]]


def test_stroke_width_of_bars_is_area_over_half_perimeter():
  # A w x L bar: area w L, perimeter 2 (w + L), so the estimate is 2 w L / (2 w + 2 L).
  for w in (1, 2, 4, 6):
    got = captions.raw_measurements(bar(w)[None], 'mnist')['thickness'][0]
    assert got == pytest.approx(2 * w * 16 / (2 * w + 2 * 16))
  assert category('thickness', [bar(1), bar(6)]) == ['thin', 'thick']


def test_slant_of_sheared_strokes():
  # A one-pixel line moving s pixels right per pixel up has shear s (up to rounding to pixels).
  for s in (-0.5, 0.0, 0.5, 1.0):
    got = captions.raw_measurements(bar(1, 20, shear=s)[None], 'mnist')['slant'][0]
    assert got == pytest.approx(s, abs=0.05)
  assert category('slant', [bar(2, 20, -0.5), bar(2, 20, 0.1), bar(2, 20, 0.6)]) == [
      'left-slanted', 'upright', 'right-slanted']


def test_float_images_in_minus_one_one_measure_like_uint8():
  images = np.stack([bar(1), bar(5, shear=0.7), bar(3, shear=-0.4, value=200)])[..., None]
  as_float = images.astype(np.float32) / 127.5 - 1.0
  for name, got in captions.measure(as_float, 'mnist').items():
    np.testing.assert_array_equal(got, captions.measure(images, 'mnist')[name])


def test_fashion_brightness_and_texture_on_hand_built_items():
  dark_plain = canvas()[0]
  dark_plain[6:22, 8:20] = 77  # 0.30
  bright_striped = canvas()[0]
  bright_striped[6:22, 8:20] = 255
  bright_striped[6:22, 8:20:2] = round(0.6 * 255)  # columns alternate 1.0, 0.6: steps of 0.4
  images = [dark_plain, bright_striped]
  raw = captions.raw_measurements(np.stack(images), 'fashion_mnist')
  np.testing.assert_allclose(raw['brightness'], [77 / 255, (255 + 153) / 2 / 255], rtol=1e-5)
  np.testing.assert_allclose(raw['texture'], [0.0, 102 / 255], rtol=1e-5)
  assert category('brightness', images, 'fashion_mnist') == ['dark', 'bright']
  assert category('texture', images, 'fashion_mnist') == ['plain', 'patterned']


def test_captions_are_seeded_and_say_the_label_and_attributes():
  rng = np.random.default_rng(0)
  labels = rng.integers(10, size=200)
  cats = {'thickness': rng.integers(2, size=200), 'slant': rng.integers(3, size=200)}
  a = captions.describe(labels, cats, dataset='mnist', seed=1)
  assert a == captions.describe(labels, cats, dataset='mnist', seed=1)
  b = captions.describe(labels, cats, dataset='mnist', seed=2)
  assert a != b and len({c for c in a}) > 50
  digit = ('zero one two three four five six seven eight nine').split()
  for text, label, t, s in zip(a, labels, cats['thickness'], cats['slant']):
    words = text.replace(',', '').split()
    assert digit[label] in words or str(label) in words, text
    assert ('thin', 'thick')[t] in words, text
    assert ('left-slanted', 'upright', 'right-slanted')[s] in words, text
    assert not any(x == 'a' and y[0] in 'aeiou8' for x, y in zip(words, words[1:])), text


def test_fashion_captions_name_the_item():
  labels = np.arange(10)
  cats = {'brightness': np.arange(10) % 2, 'texture': np.arange(10) // 5}
  for text, name in zip(captions.describe(labels, cats, dataset='fashion_mnist', seed=0),
                        ['t-shirt', 'trousers', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                         'sneaker', 'bag', 'ankle boot']):
    assert name in text, text


def test_train_split_drops_the_heldout_combinations(monkeypatch):
  # A made-up dataset: every digit with every (thickness, slant) combination, twice.
  strokes = [(w, s) for w in (1, 5) for s in (-0.6, 0.1, 0.7)]  # thin/thick x left/up/right
  images = np.stack([bar(w, 20, s) for _ in range(2) for _ in range(10) for w, s in strokes])
  labels = np.repeat(np.tile(np.arange(10), 2), len(strokes)).astype(np.int32)
  split = (images[..., None], labels)
  fake = data_lib.ImageDataset({'train': split, 'test': split})
  monkeypatch.setattr(data_lib, 'load_images', lambda *args: fake)
  words = lambda t, s: (('thin', 'thick')[t], ('left-slanted', 'upright', 'right-slanted')[s])
  combo_of = lambda i: (int(labels[i]),) + words(*divmod(i % len(strokes), 3))
  heldout = {(label, c['thickness'], c['slant']) for label, c in captions.HELDOUT['mnist']}
  expected_unseen = np.array([combo_of(i) in heldout for i in range(len(labels))])
  assert expected_unseen.sum() == 2 * len(heldout)

  train = captions.caption_arrays('mnist', 'train', data_dir=None, seed=0, max_len=16)
  test = captions.caption_arrays('mnist', 'test', data_dir=None, seed=0, max_len=16)
  np.testing.assert_array_equal(test['heldout'], expected_unseen)
  assert len(train['label']) == len(labels) - expected_unseen.sum() and not train['heldout'].any()
  seen = {(int(l), ('thin', 'thick')[t], ('left-slanted', 'upright', 'right-slanted')[s])
          for l, t, s in zip(train['label'], train['thickness'], train['slant'])}
  assert not seen & heldout and len(seen) == 60 - len(heldout)
  assert train['image'].dtype == np.uint8 and train['tokens'].shape == (len(train['label']), 16)


def test_tokenizer_round_trip_and_null_caption():
  tok = captions.CaptionTokenizer()
  assert tok.vocab_size == len(set(tok.vocab.values())) and tok.pad_id == 0
  assert captions.CaptionTokenizer().vocab == tok.vocab  # built the same way every time
  texts = captions.all_captions('mnist')[::7] + captions.all_captions('fashion_mnist')[::7]
  max_len = captions.max_caption_tokens()
  ids = tok.encode(texts, max_len)
  assert ids.dtype == np.int32 and ids.shape == (len(texts), max_len)
  assert (ids != captions.UNK_ID).all() and (ids != captions.NULL_ID).all()
  for text, row in zip(texts, ids):
    assert tok.decode(row) == text.replace(',', ' ,')
  assert (ids[:, -1] == tok.pad_id).sum() < len(ids)  # the longest captions fill max_len
  null = captions.null_tokens(3, 5)
  assert null.tolist() == [[captions.NULL_ID, 0, 0, 0, 0]] * 3
  with pytest.raises(ValueError, match='more than max_len'):
    tok.encode(['a thick, upright seven'], 3)


def test_prompts_are_lower_cased_and_bad_ones_are_named():
  tok = captions.CaptionTokenizer()
  got = tok.encode_prompt('A THICK Seven, zebra', 8)
  assert tok.decode(got) == 'a thick seven ,' and tok.unknown_words('A zebra!') == ['zebra', '!']
  for bad, why in [('', 'empty'), ('   ', 'empty'), ('zebra xylophone', 'no word')]:
    with pytest.raises(ValueError, match=why) as e:
      tok.encode_prompt(bad, 8)
    assert repr(bad) in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(ValueError, match='more than'):
    tok.encode_prompt('a thick thick thick thick seven', 4)
