"""The BERT family: an encoder-only masked language model on Multi30k sentences.

Data: one Multi30k language's sentences (train split for training and for the subword tokenizer,
val for evaluation; train/text.py finds the raw files), masked as BERT (train/mlm.py). The
tokenizer is saved in the run directory (tokenizer.json), so fill-mask needs no dataset.

Eval: masked-token loss and accuracy over the whole val split (the same masks at every eval),
beside a unigram baseline that needs no model: it predicts, for every masked token, the most
frequent non-special token of the training sentences (accuracy), and scores each with its
training frequency (loss, add-one smoothed).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import bert as bert_lib
from train import mlm
from train import storage
from train import text
from train.errors import UserError
from train.family import Family, dropout_bits

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def check_encoder_config(m) -> None:
  """UserError for a config.model group (of BERT's keys) that cannot build an encoder."""
  if m.dtype not in _DTYPES:
    raise UserError(f'config.model.dtype={m.dtype!r}: use one of {sorted(_DTYPES)}')
  if m.embed_dim % m.num_heads:
    raise UserError(f'config.model.embed_dim={m.embed_dim} is not divisible by '
                    f'config.model.num_heads={m.num_heads}')
  if m.max_len < 3:
    raise UserError(f'config.model.max_len={m.max_len}: must be >= 3 (BOS, a token, EOS)')


def build_encoder(m, vocab_size: int, rngs: nnx.Rngs) -> bert_lib.BERT:
  """BERT from config.model group `m` over `vocab_size` subword tokens."""
  return bert_lib.BERT(
      vocab_size=vocab_size, max_len=m.max_len, num_layers=m.num_layers,
      num_heads=m.num_heads, embed_dim=m.embed_dim, dropout=m.dropout,
      dropout_bits=dropout_bits(m), init_std=m.get('init_std'), pad_id=text.PAD_ID,
      attention_implementation=m.get('attention'), dtype=_DTYPES[m.dtype],
      param_dtype=jnp.float32, rngs=rngs)


_NUM_SPECIAL = len(text.SPECIAL_TOKENS)


class BERTFamily(Family):
  """config.model: max_len (tokens per sentence, BOS and EOS included), num_layers,
  num_heads, embed_dim, dropout, init_std (None: 1/sqrt(embed_dim)), attention (None: by
  backend; 'einsum', 'xla', 'cudnn'), dtype. config.data: raw_dir, language ('en' or 'de'),
  vocab_size, train_sentences and eval_sentences (0: all; else the first N).
  config.mlm: rate, mask_prob, random_prob (BERT: 0.15, 0.8, 0.1)."""

  name = 'bert'
  unit = 'tokens'
  sample_flags = ('prompt', 'top_k')

  def __init__(self, config):
    super().__init__(config)
    self.tokenizer: text.SubwordTokenizer | None = None
    check_encoder_config(config.model)
    r = config.mlm
    if not 0.0 < r.rate < 1.0 or r.mask_prob < 0 or r.random_prob < 0 or (
        r.mask_prob + r.random_prob > 1.0):
      raise UserError(f'config.mlm rate={r.rate}, mask_prob={r.mask_prob}, random_prob='
                      f'{r.random_prob}: need 0 < rate < 1 and mask_prob + random_prob <= 1')
    self._baseline: dict[str, float] = {}

  # ---- data ----
  def _mask_kwargs(self) -> dict[str, Any]:
    r = self.config.mlm
    return dict(num_special=_NUM_SPECIAL, vocab_size=self.tokenizer.vocab_size,
                mask_id=text.MASK_ID, rate=r.rate, mask_prob=r.mask_prob,
                random_prob=r.random_prob,
                num_predictions=mlm.max_predictions(self.config.model.max_len, r.rate))

  def _pad(self, sentences: list[str]) -> np.ndarray:
    return mlm.pad_sentences(self.tokenizer.encode_batch(sentences), self.config.model.max_len,
                             bos_id=text.BOS_ID, eos_id=text.EOS_ID, pad_id=text.PAD_ID)

  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    train = text.load_multi30k(c.data.raw_dir, 'train', c.data.language)
    val = text.load_multi30k(c.data.raw_dir, 'val', c.data.language)
    train = train[:c.data.train_sentences or None]
    val = val[:c.data.eval_sentences or None]
    try:
      self.tokenizer = text.SubwordTokenizer.train(train, c.data.vocab_size)
    except ValueError as e:
      raise UserError(f'config.data.vocab_size: {e}') from None
    train_ids, val_ids = self._pad(train), self._pad(val)
    common = dict(global_batch_size=c.batch_size, mask_kwargs=self._mask_kwargs(),
                  process_index=process_index, process_count=process_count)
    self._train = mlm.MaskedSentences(train_ids, seed=c.seed, **common)
    self._eval = mlm.MaskedSentences(val_ids, seed=c.seed + 1, shuffle=False,
                                     **common).eval_batches(text.PAD_ID)
    self._baseline = unigram_baseline(train_ids, self._eval, self.tokenizer.vocab_size)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._train.batch(step)

  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return self._eval

  def metadata(self) -> dict[str, Any]:
    return {'vocab_size': self.tokenizer.vocab_size, **self._baseline}

  def load_metadata(self, metadata: dict[str, Any]) -> None:
    self._vocab_size = metadata['vocab_size']

  def write_run_files(self, workdir: str) -> None:
    text.save_in_workdir(self.tokenizer, workdir)

  def read_run_files(self, workdir: str) -> None:
    self.tokenizer = text.load_from_workdir(workdir)
    if self.tokenizer.vocab_size != self._vocab_size:
      raise UserError(f'{workdir}/{text.TOKENIZER_FILE}: vocabulary of '
                      f'{self.tokenizer.vocab_size} tokens, but the run was trained with '
                      f'{self._vocab_size} (family.json)')

  # ---- model and loss ----
  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    return {'model': build_encoder(self.config.model, self.tokenizer.vocab_size, rngs)}

  def _masked_nll(self, models, batch, rng):
    logits = models['model'].mlm_logits(batch['tokens'], batch['positions'], dropout_key=rng)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])
    correct = (jnp.argmax(logits, -1) == batch['labels']).astype(jnp.float32)
    return nll, correct, batch['weights']

  def loss(self, models, batch, rng, *, train: bool):
    nll, correct, w = self._masked_nll(models, batch, rng if train else None)
    count = jnp.maximum(w.sum(), 1.0)
    return (nll * w).sum() / count, {'mlm_accuracy': (correct * w).sum() / count}

  def eval_step(self, models, batch):
    # Sums, not means: the loop averages batch values, and sum/count ratios of those averages
    # are exact token-level figures whatever each batch's number of masked tokens.
    nll, correct, w = self._masked_nll(models, batch, None)
    return {'nll_sum': (nll * w).sum(), 'correct_sum': (correct * w).sum(),
            'masked_tokens': w.sum()}

  def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    count = max(metrics['masked_tokens'], 1e-9)
    loss = metrics['nll_sum'] / count
    return {'loss': loss, 'mlm_accuracy': metrics['correct_sum'] / count,
            'perplexity': math.exp(min(loss, 700.0)), **self._baseline}

  # ---- reporting ----
  def items_per_step(self) -> int:
    return self.config.batch_size * self.config.model.max_len

  # ---- fill-mask ----
  def fill_mask(self, model: bert_lib.BERT, prompt: str, top_k: int = 5
                ) -> list[list[tuple[str, float]]]:
    """Per [MASK] of `prompt` (left to right), the top_k fillers and their probabilities."""
    if not prompt or '[MASK]' not in prompt:
      raise UserError(f'--prompt={prompt!r}: needs at least one [MASK] to fill, e.g. '
                      '"a man in a [MASK] shirt ."')
    vocab = self.tokenizer.vocab_size
    if not 1 <= top_k <= vocab:
      raise UserError(f'--top_k={top_k}: must be in [1, {vocab}]')
    ids = self.tokenizer.encode(prompt)
    max_len = self.config.model.max_len
    if len(ids) + 2 > max_len:
      raise UserError(f'--prompt: {len(ids)} tokens, but the model reads at most '
                      f'{max_len - 2} (config.model.max_len={max_len} with BOS and EOS)')
    tokens = np.concatenate([[text.BOS_ID], ids, [text.EOS_ID]]).astype(np.int32)[None]
    positions = np.flatnonzero(tokens[0] == text.MASK_ID).astype(np.int32)[None]
    logits = _fill_logits(*nnx.split(model), jnp.asarray(tokens), jnp.asarray(positions))
    probs = np.asarray(jax.nn.softmax(logits[0], axis=-1))
    out = []
    for row in probs:
      best = np.argsort(-row, kind='stable')[:top_k]
      out.append([(self.tokenizer.decode([i]).strip() or self.tokenizer.id_to_token(i),
                   float(row[i])) for i in best])
    return out

  def sample(self, models, rng, workdir, options) -> str:
    del rng, workdir  # fill-mask is deterministic
    prompt = options.get('prompt')
    if prompt is None:
      raise UserError('--prompt is required for a bert run, e.g. --prompt="a man in a [MASK] '
                      'shirt ."')
    top_k = 5 if options.get('top_k') is None else options['top_k']
    lines = [f'prompt: {prompt}']
    for i, fillers in enumerate(self.fill_mask(models['model'], prompt, top_k)):
      lines.append(f'[MASK] #{i + 1}: ' + '  '.join(f'{w!r} {p:.3f}' for w, p in fillers))
    return '\n'.join(lines)

  def write_samples(self, models, rng, path: str) -> None:
    prompt = 'A man in a [MASK] shirt is playing [MASK] .'
    storage.write_text(path + '.txt',
                       self.sample(models, rng, '', {'prompt': prompt, 'top_k': 5}) + '\n')


def _fill_logits(graphdef, state, tokens, positions):
  """Jitted `mlm_logits` of one prompt (a fresh model from split state)."""
  return jax.jit(lambda s, t, p: nnx.merge(graphdef, s).mlm_logits(t, p))(state, tokens,
                                                                          positions)


def unigram_baseline(train_ids: np.ndarray, eval_batches: list[dict[str, np.ndarray]],
                     vocab_size: int) -> dict[str, float]:
  """The masked-token accuracy of always predicting the most frequent non-special training
  token, and the loss of predicting the training unigram distribution (add-one smoothed), on
  the eval batches' masked tokens."""
  counts = np.bincount(train_ids.reshape(-1), minlength=vocab_size).astype(np.float64)
  counts[:_NUM_SPECIAL] = 0
  top = int(np.argmax(counts))
  log_prob = np.log((counts + 1) / (counts + 1)[_NUM_SPECIAL:].sum())
  correct = nll = n = 0.0
  for b in eval_batches:
    w = b['weights']
    correct += float(((b['labels'] == top) * w).sum())
    nll += float((-log_prob[b['labels']] * w).sum())
    n += float(w.sum())
  n = max(n, 1e-9)
  return {'unigram_baseline_accuracy': correct / n, 'unigram_baseline_loss': nll / n}
