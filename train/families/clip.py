"""The contrastive text-image family (CLIP-style) on captioned MNIST / Fashion-MNIST.

Network: models/clip.py (a CNN image encoder, a transformer text encoder, a learned logit
scale). Data: train/captions.py's captions of the train split (held-out attribute combinations
left out), one caption per image, drawn from `config.seed`; each step takes `batch_size`
(image, caption) pairs in a shuffled order that is a pure function of (seed, step), as the image
families (train/data.py ImageBatches). Loss: CLIP's symmetric InfoNCE over the batch.

Captions say only the class and a few attribute words, so a batch often holds several pairs of
the same combination: their captions are false negatives for each other (CLIP's loss ignores
this). The retrieval eval therefore counts a hit when a retrieved item has the query's
combination (label and every attribute), not only when it is the query's own pair.

The loop's eval: the loss and in-batch accuracies on the first `eval_batches` test batches.
`python -m train.evaluate --workdir=DIR [--batch=500] [--report=PATH]`: over the whole test
split (10,000 images and their captions), text->image and image->text recall@1 and @5
(a hit: one of the top k has the query's combination), for queries of seen and of unseen
(held-out) combinations, the chance rate of a hit at 1, and label-only recall@1; written to
DIR/eval/clip_test_step<S>.json.
`python -m train.sample --workdir=DIR --prompt="a thick, upright seven" [--num_samples=16]
[--out=x.png]`: the test images that score highest for the prompt, as a grid.
`clip_score(models, images, tokens)` is the per-pair cosine other code scores images with.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import clip as clip_lib
from models import retriever as retriever_lib
from train import captions
from train import data as data_lib
from train import images as images_lib
from train import storage
from train.errors import UserError
from train.family import Family, dropout_bits

RECALL_AT = (1, 5)


class CLIPFamily(Family):
  """config.model: proj_dim, channels (two conv widths), hidden (CNN feature width), max_len
  (caption tokens), num_layers, num_heads, embed_dim (text encoder), dropout, dropout_bits
  (`models.layers.dropout`), attention, dtype.
  config.data: name ('mnist' | 'fashion_mnist'), data_dir, raw_dir. config.eval_batches: test
  batches of each loop eval."""

  name = 'clip'
  unit = 'pairs'
  sample_flags = ('prompt', 'num_samples', 'out')
  evaluate_flags = ('batch', 'report')

  def __init__(self, config):
    super().__init__(config)
    captions.check_text_config(config, 'model')
    images_lib.activation_dtype(config)
    self.tokenizer = captions.CaptionTokenizer()
    self.image_shape: tuple[int, int, int] | None = None
    self.class_names: list[str] = []

  @property
  def dataset(self) -> str:
    return self.config.data.name

  # ---- data ----
  def captioned(self, split: str) -> dict[str, np.ndarray]:
    """`captions.caption_arrays` of `split` with this run's data settings."""
    c = self.config
    try:
      return captions.caption_arrays(self.dataset, split, data_dir=c.data.data_dir,
                                     raw_dir=c.data.raw_dir, seed=c.seed,
                                     max_len=c.model.max_len)
    except ValueError as e:
      raise UserError(f'config.data: {e}') from None

  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    self._train_data = self.captioned('train')
    test = self.captioned('test')
    self.image_shape = tuple(self._train_data['image'].shape[1:])
    self.class_names = list(data_lib.load_images(self.dataset, c.data.data_dir,
                                                 c.data.raw_dir).class_names)
    self._order = data_lib.ImageBatches(
        self._train_data['image'], self._train_data['label'], global_batch_size=c.batch_size,
        seed=c.seed, process_index=process_index, process_count=process_count)
    local = c.batch_size // process_count
    self._rows = slice(process_index * local, (process_index + 1) * local)
    full = len(test['label']) // c.batch_size
    n = full if c.eval_batches <= 0 else min(c.eval_batches, full)
    if n < 1:
      raise UserError(f'config.batch_size={c.batch_size} exceeds the {len(test["label"])} test '
                      'examples (evaluation uses whole batches): lower it')
    self._eval = []
    for b in range(n):
      rows = np.arange(b * c.batch_size, (b + 1) * c.batch_size)[self._rows]
      self._eval.append({'image': test['image'][rows], 'tokens': test['tokens'][rows]})

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    idx = self._order.indices(step)[self._rows]
    return {'image': self._train_data['image'][idx], 'tokens': self._train_data['tokens'][idx]}

  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return self._eval

  def metadata(self) -> dict[str, Any]:
    return {'image_shape': list(self.image_shape), 'class_names': self.class_names,
            'vocab_size': self.tokenizer.vocab_size}

  def load_metadata(self, metadata: dict[str, Any]) -> None:
    self.image_shape = tuple(metadata['image_shape'])
    self.class_names = list(metadata['class_names'])
    if metadata['vocab_size'] != self.tokenizer.vocab_size:
      raise UserError(f'family.json: a caption vocabulary of {metadata["vocab_size"]} words, '
                      f'but train/captions.py now has {self.tokenizer.vocab_size}: the run was '
                      'trained with another caption grammar')

  # ---- model and loss ----
  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    m = self.config.model
    return {'model': clip_lib.CLIP(
        image_shape=self.image_shape, vocab_size=self.tokenizer.vocab_size, max_len=m.max_len,
        proj_dim=m.proj_dim, channels=tuple(m.channels), hidden=m.hidden,
        num_layers=m.num_layers, num_heads=m.num_heads, embed_dim=m.embed_dim,
        dropout=m.dropout, dropout_bits=dropout_bits(m), pad_id=captions.PAD_ID,
        attention_implementation=m.get('attention'),
        dtype=images_lib.activation_dtype(self.config), rngs=rngs)}

  def loss(self, models, batch, rng, *, train: bool):
    model = models['model']
    image_key, text_key = jax.random.split(rng) if train else (None, None)
    image_emb = model.embed_images(images_lib.to_float(batch['image']), dropout_key=image_key)
    text_emb = model.embed_texts(batch['tokens'], dropout_key=text_key)
    scale = model.scale()
    loss, metrics = clip_lib.symmetric_info_nce(image_emb, text_emb, scale)
    return loss, {**metrics, 'logit_scale': scale}

  # ---- retrieval ----
  def evaluate(self, models, workdir: str, step: int, options: dict[str, Any]) -> str:
    batch = options.get('batch') or 500
    if batch < 1:
      raise UserError(f'--batch={batch}: must be >= 1')
    test = self.captioned('test')
    image_emb = embed_images(models, test['image'], batch)
    text_emb = embed_texts(models, test['tokens'], batch)
    names = captions.DATASET_ATTRIBUTES[self.dataset]
    combo = test['label'].astype(np.int64)
    for name in names:  # one integer per (label, attributes) combination
      combo = combo * len(captions.ATTRIBUTES[name]) + test[name]
    report = {'workdir': storage.absolute(workdir), 'family': self.name,
              'checkpoint_step': step, 'dataset': self.dataset, 'split': 'test',
              'pairs': len(combo), 'unseen_pairs': int(test['heldout'].sum()),
              'hit': 'a retrieved item has the query\'s label and every attribute'}
    k = max(RECALL_AT)
    for direction, queries, pool in (('text_to_image', text_emb, image_emb),
                                     ('image_to_text', image_emb, text_emb)):
      _, ids = retriever_lib.top_k_inner_product(jnp.asarray(queries), jnp.asarray(pool), k)
      ids = np.asarray(ids)
      hits = combo[ids] == combo[:, None]                         # [n, k]
      label_hit = test['label'][ids[:, 0]] == test['label']
      share = np.bincount(combo)[combo] / len(combo)              # chance of a hit at 1
      for part, rows in (('seen', ~test['heldout']), ('unseen', test['heldout'])):
        report[f'{direction}/{part}'] = {
            **{f'recall@{r}': float(hits[rows, :r].any(1).mean()) for r in RECALL_AT},
            'label_recall@1': float(label_hit[rows].mean()),
            'chance@1': float(share[rows].mean()), 'queries': int(rows.sum())}
    path = options.get('report') or storage.join(workdir, 'eval', f'clip_test_step{step}.json')
    storage.write_text(path, json.dumps(report, indent=1))
    lines = [f'{self.name} step {step}, {self.dataset} test: {len(combo)} pairs '
             f'({report["unseen_pairs"]} of held-out combinations); a hit has the query\'s '
             'label and attributes']
    for key, r in report.items():
      if isinstance(r, dict):
        lines.append(f'  {key:22s} ' + '  '.join(
            f'{m} {r[m]:.3f}' for m in ('recall@1', 'recall@5', 'label_recall@1', 'chance@1')))
    return '\n'.join(lines + [f'wrote {path}'])

  def sample(self, models, rng, workdir: str, options: dict[str, Any]) -> str:
    """The test images that match `--prompt` best, as a PNG grid (retrieval, not generation)."""
    del rng
    prompt = options.get('prompt')
    if prompt is None:
      raise UserError('--prompt is required for a clip run, e.g. --prompt="a thick, upright '
                      'seven"')
    try:
      tokens = self.tokenizer.encode_prompt(prompt, self.config.model.max_len)
    except ValueError as e:
      raise UserError(f'--prompt: {e}') from None
    num = options.get('num_samples') or 16
    if num < 1:
      raise UserError(f'--num_samples={num}: must be >= 1')
    test = self.captioned('test')
    scores = embed_images(models, test['image']) @ embed_texts(models, tokens[None])[0]
    best = np.argsort(-scores, kind='stable')[:num]
    out = options.get('out') or storage.join(workdir, 'samples', 'retrieved.png')
    path = images_lib.save_grid(out, test['image'][best], [f'{scores[i]:.2f}' for i in best])
    unknown = self.tokenizer.unknown_words(prompt)
    note = f' (ignored unknown words: {" ".join(unknown)})' if unknown else ''
    return f'wrote the {len(best)} test images closest to {prompt!r} to {path}{note}'


# ---- scoring: embeddings and per-pair cosines, in fixed-size batches (one compilation) ----
@functools.partial(jax.jit, static_argnums=0)
def _embed_images(graphdef, state, images):
  return nnx.merge(graphdef, state).embed_images(images_lib.to_float(images))


@functools.partial(jax.jit, static_argnums=0)
def _embed_texts(graphdef, state, tokens):
  return nnx.merge(graphdef, state).embed_texts(tokens)


def _batched(fn, model: clip_lib.CLIP, x: np.ndarray, batch: int) -> np.ndarray:
  graphdef, state = nnx.split(model)
  batch = min(batch, len(x))
  out = []
  for lo in range(0, len(x), batch):
    chunk = x[lo:lo + batch]
    pad = batch - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(graphdef, state, jnp.asarray(chunk)))[:batch - pad])
  return np.concatenate(out)


def embed_images(models, images: np.ndarray, batch: int = 500) -> np.ndarray:
  """uint8 images `[n, H, W, C]` -> unit-length float32 `[n, proj_dim]`."""
  return _batched(_embed_images, models['model'], np.asarray(images), batch)


def embed_texts(models, tokens: np.ndarray, batch: int = 500) -> np.ndarray:
  """Caption ids `[n, max_len]` (`captions.CaptionTokenizer.encode`) -> unit-length float32
  `[n, proj_dim]`."""
  return _batched(_embed_texts, models['model'], np.asarray(tokens, np.int32), batch)


def clip_score(models, images, tokens, batch: int = 500) -> np.ndarray:
  """Cosine similarity float32 `[n]` of each image with its caption: images `[n, H, W, C]`
  float in [-1, 1] (what the diffusion model generates) or uint8; tokens `[n, max_len]`."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = images_lib.to_uint8(images)  # the encoder sees what a saved image would hold
  if len(images) != len(tokens):
    raise ValueError(f'clip_score: {len(images)} images but {len(tokens)} captions')
  return (embed_images(models, images, batch) * embed_texts(models, tokens, batch)).sum(-1)
