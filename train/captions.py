"""Captions for MNIST and Fashion-MNIST: the label plus attributes measured from the pixels.

Each image gets a caption such as "a thick, left-slanted seven" or "a dark, patterned coat",
written from its label and from attributes `measure` computes on its pixels, in one of several
phrasings drawn from a seed. Text-to-image diffusion trains on them and the contrastive family
learns to score image-caption pairs; `measure` is also how generated images are checked against
their prompt.

Attributes (`ATTRIBUTES`: name -> category words, low to high; `DATASET_ATTRIBUTES`: which ones a
dataset's captions use). They were chosen because they vary WITHIN every class, so that each
(label, attributes) combination has examples: MNIST digits are size-normalised into a 20x20 box
and centred by their centre of mass (LeCun et al.'s MNIST page), so size and position mostly
follow the class (a 1 is always narrow) or do not vary at all; stroke width and slant do.
Fashion-MNIST items differ little in slant and their size follows the class (sandals small,
pullovers large), while brightness and surface texture vary inside each class and are
uncorrelated with each other (r = -0.01 on the train split).
- thickness (thin, thick): stroke width ~ ink area / half the ink's perimeter (ink: intensity
  > 0.5; a w x L bar gives 2wL / (2w + 2L) ~ w).
- slant (left-slanted, upright, right-slanted): the shear of the intensity-weighted second
  moments, -cov(x, y) / var(y) with y pointing down: how many pixels the ink moves right per
  pixel up (0 for a vertical stroke, 1 for 45 degrees to the right).
- brightness (dark, bright): mean intensity over the object (intensity > 0.05).
- texture (plain, patterned): mean absolute horizontal intensity step between neighbouring
  object pixels (stripes, prints and folds make it high).
The category thresholds are quantiles of the TRAIN split (median; terciles for slant), so the
categories are balanced over the dataset: `python -m train.captions --data_dir=TFDS_DIR
[--raw_dir=RAW_DIR]` recomputes `THRESHOLDS` and prints them.

Held-out combinations (`HELDOUT`) are dropped from the train split entirely; the test split is
split into seen and unseen combinations by `is_heldout`, to measure generalisation to
combinations never trained on.

Tokens: `CaptionTokenizer`, a word-level vocabulary (the `tokenizers` WordLevel model, which
also lower-cases, splits and serialises to JSON) enumerated from the caption grammar of both
datasets, so it is the same in every run. Ids: [PAD] 0, [UNK] 1, [NULL] 2. The null caption
(classifier-free guidance's unconditional input) is one [NULL] token followed by padding
(`null_tokens`).
"""

from __future__ import annotations

import argparse
import itertools
from typing import Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from train.errors import UserError

DATASETS = ('mnist', 'fashion_mnist')

# Attribute name -> category words, in increasing order of the measured value.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    'thickness': ('thin', 'thick'),
    'slant': ('left-slanted', 'upright', 'right-slanted'),
    'brightness': ('dark', 'bright'),
    'texture': ('plain', 'patterned'),
}
DATASET_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    'mnist': ('thickness', 'slant'),
    'fashion_mnist': ('brightness', 'texture'),
}

# Category boundaries (len(words) - 1 per attribute), train-split quantiles written by
# `python -m train.captions --data_dir=...` (see the module docstring).
THRESHOLDS: dict[str, dict[str, tuple[float, ...]]] = {
    'mnist': {'thickness': (1.96,), 'slant': (-0.0101, 0.2236)},
    'fashion_mnist': {'brightness': (0.6363,), 'texture': (0.1164,)},
}

# (label, {attribute: category word}) combinations that never appear in a train split.
HELDOUT: dict[str, tuple[tuple[int, dict[str, str]], ...]] = {
    'mnist': ((7, {'thickness': 'thick', 'slant': 'left-slanted'}),
              (2, {'thickness': 'thin', 'slant': 'upright'}),
              (5, {'thickness': 'thick', 'slant': 'right-slanted'})),
    'fashion_mnist': ((4, {'brightness': 'dark', 'texture': 'patterned'}),
                      (7, {'brightness': 'bright', 'texture': 'plain'})),
}

DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
FASHION_NAMES = ('t-shirt', 'pair of trousers', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                 'sneaker', 'bag', 'ankle boot')

# Phrasings; {thickness}, {slant}, ... are category words, {noun} the class word. "a" before a
# vowel sound becomes "an" (`_articles`).
TEMPLATES: dict[str, tuple[str, ...]] = {
    'mnist': ('a {thickness}, {slant} {noun}',
              'a {slant} {noun} written with a {thickness} stroke',
              'the digit {noun}, {thickness} and {slant}',
              'a {thickness} {noun} that is {slant}',
              'a handwritten {noun} in a {slant}, {thickness} hand'),
    'fashion_mnist': ('a {brightness}, {texture} {noun}',
                      'a {texture} {noun} in a {brightness} shade',
                      'a photo of a {brightness} {noun} with a {texture} surface',
                      'a {noun} that is {brightness} and {texture}'),
}

PAD_ID, UNK_ID, NULL_ID = 0, 1, 2
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[NULL]')

# Pixel thresholds on intensities in [0, 1]: strokes, and objects (Fashion-MNIST backgrounds
# are exactly 0, their items' darkest parts ~0.1).
INK = 0.5
OBJECT = 0.05


def _check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(f'dataset {dataset!r}: captions exist for {", ".join(DATASETS)}')


def attributes_of(dataset: str) -> dict[str, tuple[str, ...]]:
  """The attributes `dataset`'s captions use, in caption order: name -> category words."""
  _check_dataset(dataset)
  return {name: ATTRIBUTES[name] for name in DATASET_ATTRIBUTES[dataset]}


# ---- measuring ----
def _intensity(images: np.ndarray) -> np.ndarray:
  """uint8 0..255 or float [-1, 1] images [N, H, W] / [N, H, W, 1] -> float32 [N, H, W] in [0, 1]."""
  x = np.asarray(images)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 3:
    raise ValueError(f'images must be [N, H, W] or [N, H, W, 1], got shape {x.shape}')
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  return np.clip((x.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)


def raw_measurements(images: np.ndarray, dataset: str) -> dict[str, np.ndarray]:
  """The measured value per image of each of `dataset`'s attributes: float32 [N] each.

  images: [N, H, W] or [N, H, W, 1], uint8 in 0..255 or float in [-1, 1] (what
  `train.images.to_float` gives and the diffusion model generates).
  """
  _check_dataset(dataset)
  x = _intensity(images)  # [N, H, W]
  out = {}
  if 'thickness' in DATASET_ATTRIBUTES[dataset]:
    ink = np.pad(x > INK, ((0, 0), (1, 1), (1, 1)))
    area = ink.sum((1, 2))
    # Ink/background pixel edges: the perimeter of the ink in pixel units.
    perimeter = ((ink[:, 1:] != ink[:, :-1]).sum((1, 2)) +
                 (ink[:, :, 1:] != ink[:, :, :-1]).sum((1, 2)))
    out['thickness'] = (2.0 * area / np.maximum(perimeter, 1)).astype(np.float32)
  if 'slant' in DATASET_ATTRIBUTES[dataset]:
    rows, cols = np.mgrid[:x.shape[1], :x.shape[2]].astype(np.float32)
    mass = np.maximum(x.sum((1, 2)), 1e-6)
    mean_x = (x * cols).sum((1, 2)) / mass
    mean_y = (x * rows).sum((1, 2)) / mass
    dx = cols - mean_x[:, None, None]
    dy = rows - mean_y[:, None, None]
    cov_xy = (x * dx * dy).sum((1, 2)) / mass
    var_y = (x * dy * dy).sum((1, 2)) / mass
    out['slant'] = (-cov_xy / np.maximum(var_y, 1e-6)).astype(np.float32)
  if dataset == 'fashion_mnist':
    obj = x > OBJECT
    count = np.maximum(obj.sum((1, 2)), 1)
    out['brightness'] = ((x * obj).sum((1, 2)) / count).astype(np.float32)
    both = obj[:, :, 1:] & obj[:, :, :-1]
    steps = np.abs(np.diff(x, axis=2)) * both
    out['texture'] = (steps.sum((1, 2)) / np.maximum(both.sum((1, 2)), 1)).astype(np.float32)
  return out


def measure(images: np.ndarray, dataset: str = 'mnist') -> dict[str, np.ndarray]:
  """Category index (into `ATTRIBUTES[name]`) per image of each of `dataset`'s attributes.

  images: [N, H, W] or [N, H, W, 1], uint8 in 0..255 or float in [-1, 1]. Vectorised numpy.
  Returns: attribute name -> int32 [N].
  """
  values = raw_measurements(images, dataset)
  return {name: np.digitize(values[name], THRESHOLDS[dataset][name]).astype(np.int32)
          for name in DATASET_ATTRIBUTES[dataset]}


# ---- held-out combinations ----
def is_heldout(labels: np.ndarray, categories: Mapping[str, np.ndarray],
               dataset: str = 'mnist') -> np.ndarray:
  """bool [N]: whether (label, categories) of each example is one of `HELDOUT[dataset]`."""
  _check_dataset(dataset)
  labels = np.asarray(labels)
  out = np.zeros(labels.shape, bool)
  for label, combo in HELDOUT[dataset]:
    hit = labels == label
    for name, word in combo.items():
      hit &= np.asarray(categories[name]) == ATTRIBUTES[name].index(word)
    out |= hit
  return out


# ---- captions ----
def _articles(text: str) -> str:
  """"a" -> "an" before a vowel sound ("an upright 8", "an eight")."""
  words = text.split(' ')
  for i in range(len(words) - 1):
    if words[i] == 'a' and (words[i + 1][0] in 'aeiou8'):
      words[i] = 'an'
  return ' '.join(words)


def _nouns(dataset: str, label: int) -> tuple[str, ...]:
  """The words a caption may use for class `label`."""
  if dataset == 'mnist':
    return (DIGIT_NAMES[label], str(label))
  return (FASHION_NAMES[label],)


def describe(labels: np.ndarray, categories: Mapping[str, np.ndarray], *, dataset: str,
             seed: int) -> list[str]:
  """One caption per example: its class and attribute words in a phrasing drawn from `seed`.

  labels: int [N]; categories: attribute name -> int [N] category indices (as `measure`
  returns). The same seed gives the same captions.
  """
  _check_dataset(dataset)
  labels = np.asarray(labels)
  names = DATASET_ATTRIBUTES[dataset]
  templates = TEMPLATES[dataset]
  rng = np.random.default_rng(seed)
  which = rng.integers(len(templates), size=len(labels))
  noun_pick = rng.integers(2, size=len(labels))  # digit name or numeral
  out = []
  for i, label in enumerate(labels):
    nouns = _nouns(dataset, int(label))
    words = {name: ATTRIBUTES[name][int(categories[name][i])] for name in names}
    out.append(_articles(templates[which[i]].format(noun=nouns[noun_pick[i] % len(nouns)],
                                                    **words)))
  return out


def all_captions(dataset: str) -> list[str]:
  """Every caption the grammar can write for `dataset` (every template, class word, category)."""
  names = DATASET_ATTRIBUTES[dataset]
  out = []
  for template in TEMPLATES[dataset]:
    for label in range(10):
      for noun in _nouns(dataset, label):
        for combo in itertools.product(*(ATTRIBUTES[n] for n in names)):
          out.append(_articles(template.format(noun=noun, **dict(zip(names, combo)))))
  return out


# ---- tokens ----
class CaptionTokenizer:
  """Word-level ids for captions; the vocabulary is the caption grammar's words (both datasets),
  in sorted order after the special tokens, so every run builds the same one."""

  def __init__(self):
    self._tokenizer = tokenizers.Tokenizer(WordLevel({'[PAD]': 0}, unk_token='[UNK]'))
    self._tokenizer.normalizer = normalizers.Lowercase()
    # Words keep their hyphens ("left-slanted", "t-shirt"); other punctuation is its own token.
    self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(tokenizers.Regex(r'[^\w\s-]'), 'isolated')])
    words = sorted({w for dataset in DATASETS for text in all_captions(dataset)
                    for w, _ in self._tokenizer.pre_tokenizer.pre_tokenize_str(text.lower())})
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(words))}
    self._tokenizer.model = WordLevel(vocab, unk_token='[UNK]')
    self.vocab = vocab
    self._words = {i: w for w, i in vocab.items()}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  pad_id = PAD_ID
  null_id = NULL_ID

  def _ids(self, text: str) -> list[int]:
    return self._tokenizer.encode(text).ids

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len]: each caption's ids, then [PAD]. ValueError when one does
    not fit."""
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for i, ids in enumerate(e.ids for e in self._tokenizer.encode_batch(list(texts))):
      if len(ids) > max_len:
        raise ValueError(f'caption {texts[i]!r} has {len(ids)} tokens, more than max_len='
                         f'{max_len}')
      out[i, :len(ids)] = ids
    return out

  def unknown_words(self, text: str) -> list[str]:
    """The words of `text` that are not in the vocabulary."""
    return [w for w, _ in self._tokenizer.pre_tokenizer.pre_tokenize_str(text.lower())
            if w not in self.vocab]

  def encode_prompt(self, text: str, max_len: int) -> np.ndarray:
    """int32 [max_len] ids of a user's prompt, unknown words left out (`unknown_words` lists
    them). ValueError (one line naming the prompt) when it is empty, has no known word, or is
    longer than max_len tokens."""
    if not text or not text.strip():
      raise ValueError(f'prompt {text!r} is empty: describe an image, e.g. "a thick seven"')
    ids = [i for i in self._ids(text) if i != UNK_ID]
    if not ids:
      words = sorted(self.vocab, key=self.vocab.get)[len(SPECIAL_TOKENS):]
      raise ValueError(f'prompt {text!r} has no word the captions use (e.g. '
                       f'{", ".join([w for w in words if w.isalpha()][:12])} ...)')
    if len(ids) > max_len:
      raise ValueError(f'prompt {text!r} has {len(ids)} known tokens, more than the model\'s '
                       f'max_len={max_len}')
    return np.pad(np.asarray(ids, np.int32), (0, max_len - len(ids)), constant_values=PAD_ID)

  def decode(self, ids: Sequence[int]) -> str:
    """The words of `ids`, padding left out."""
    return ' '.join(self._words[int(i)] for i in ids if int(i) != PAD_ID)

  def to_str(self) -> str:
    return self._tokenizer.to_str()


def null_tokens(num: int, max_len: int) -> np.ndarray:
  """int32 [num, max_len]: the null caption (one [NULL], then [PAD]) for classifier-free
  guidance's unconditional branch."""
  out = np.full((num, max_len), PAD_ID, np.int32)
  out[:, 0] = NULL_ID
  return out


def max_caption_tokens() -> int:
  """The longest caption of either grammar, in tokens (a max_len that fits every caption)."""
  tok = CaptionTokenizer()
  return max(len(tok._ids(t)) for d in DATASETS for t in all_captions(d))  # pylint: disable=protected-access


def check_text_config(config, key: str) -> None:
  """UserError unless config.data.name has captions and the text encoder config `key` (e.g.
  'model', 'text': embed_dim, num_heads, max_len) can read every caption."""
  if config.data.name not in DATASETS:
    raise UserError(f'config.data.name={config.data.name!r}: captions exist for '
                    f'{", ".join(DATASETS)}')
  t = config[key]
  if t.embed_dim % t.num_heads:
    raise UserError(f'config.{key}.embed_dim={t.embed_dim} is not divisible by '
                    f'config.{key}.num_heads={t.num_heads}')
  longest = max_caption_tokens()
  if t.max_len < longest:
    raise UserError(f'config.{key}.max_len={t.max_len}: the longest caption has {longest} '
                    'tokens')


# ---- datasets ----
def caption_arrays(dataset: str, split: str, *, data_dir: str | None, seed: int, max_len: int,
                   raw_dir: str | None = None) -> dict[str, np.ndarray]:
  """A captioned split, read like `train.images` reads it (TFDS data_dir, or $TFDS_DATA_DIR
  when None; prepared from `raw_dir` when missing; nothing downloads when raw_dir is given).

  Returns numpy arrays with one row per example: image uint8 [N, H, W, 1], label int32 [N],
  caption str [N], tokens int32 [N, max_len], one int32 [N] column of category indices per
  attribute, heldout bool [N]. The train split leaves out the held-out combinations (heldout is
  then all False); other splits keep them, flagged.
  """
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  _check_dataset(dataset)
  splits = data_lib.load_images(dataset, data_dir, raw_dir)
  if split not in splits:
    raise ValueError(f'split {split!r}: {dataset} has {", ".join(sorted(splits))}')
  images, labels = splits[split]
  categories = measure(images, dataset)
  heldout = is_heldout(labels, categories, dataset)
  if split == 'train':
    keep = ~heldout
    images, labels, heldout = images[keep], labels[keep], heldout[keep]
    categories = {k: v[keep] for k, v in categories.items()}
  captions = describe(labels, categories, dataset=dataset, seed=seed)
  return {'image': images, 'label': labels.astype(np.int32), 'caption': np.asarray(captions),
          'tokens': CaptionTokenizer().encode(captions, max_len), **categories,
          'heldout': heldout}


def compute_thresholds(images: np.ndarray, dataset: str) -> dict[str, tuple[float, ...]]:
  """Quantile thresholds of `dataset`'s attributes on `images` (the train split), rounded to
  4 decimals: equal shares per category."""
  values = raw_measurements(images, dataset)
  out = {}
  for name in DATASET_ATTRIBUTES[dataset]:
    k = len(ATTRIBUTES[name])
    qs = np.quantile(values[name], [i / k for i in range(1, k)])
    out[name] = tuple(round(float(q), 4) for q in qs)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description='Recompute THRESHOLDS from the train splits.')
  parser.add_argument('--data_dir', default=None, help='TFDS data_dir (default $TFDS_DATA_DIR)')
  parser.add_argument('--raw_dir', default=None, help='raw IDX files to prepare a dataset from')
  parser.add_argument('--datasets', default=','.join(DATASETS))
  args = parser.parse_args(argv)
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  for dataset in args.datasets.split(','):
    _check_dataset(dataset)
    raw = None if args.raw_dir is None else f'{args.raw_dir}/{dataset}'
    images, labels = data_lib.load_images(dataset, args.data_dir, raw)['train']
    thresholds = compute_thresholds(images, dataset)
    categories = {n: np.digitize(raw_measurements(images, dataset)[n], thresholds[n])
                  for n in thresholds}
    print(f'{dataset!r}: {thresholds},')
    for n, c in categories.items():
      print(f'  # {n}: shares {np.round(np.bincount(c) / len(c), 3).tolist()}')
    held = is_heldout(labels, categories, dataset).sum()
    print(f'  # held-out train examples with these thresholds: {held} of {len(labels)}')


if __name__ == '__main__':
  main()
