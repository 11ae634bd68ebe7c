"""Masked-language-model data (BERT): padded sentences, BERT's masking, batches by step.

A sentence becomes `[BOS] tokens [EOS]` padded with `[PAD]` to `max_len` (longer ones keep their
first max_len - 2 tokens: truncated, not dropped, so every sentence counts). BERT's masking
(Devlin et al. 2019, section 3.1 and appendix A.1): 15% of the non-special tokens of each
sentence are chosen for prediction; a chosen token becomes `[MASK]` with probability 0.8, a
uniformly random non-special token with probability 0.1, and stays as it is otherwise. The number
chosen in a sentence with n candidates is floor(0.15 n + u), u ~ U[0, 1) (stochastic rounding):
its mean is exactly 0.15 n, and it never exceeds ceil(0.15 n), so `max_predictions` =
ceil(0.15 (max_len - 2)) positions per sentence always suffice (BERT's masked_lm_positions).

Batches are a pure function of (seed, step): the sentence order is a permutation per epoch keyed
by (seed, epoch), and the masks of a step come from a generator keyed by (seed, step). A resumed
run therefore sees exactly the batches an uninterrupted one would, and the global batch is the
same whatever the process count (each process takes its contiguous slice of rows).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from train.errors import UserError


def pad_sentences(ids: list[np.ndarray], max_len: int, *, bos_id: int, eos_id: int,
                  pad_id: int) -> np.ndarray:
  """Token ids of each sentence -> `[num_sentences, max_len]` int32 of BOS ids EOS PAD..."""
  out = np.full((len(ids), max_len), pad_id, np.int32)
  for i, sentence in enumerate(ids):
    sentence = sentence[:max_len - 2]
    out[i, 0] = bos_id
    out[i, 1:1 + len(sentence)] = sentence
    out[i, 1 + len(sentence)] = eos_id
  return out


def max_predictions(max_len: int, rate: float) -> int:
  """Prediction slots per sentence: enough for any sentence of up to max_len - 2 candidates."""
  return max(1, math.ceil(rate * (max_len - 2)))


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, *, num_special: int,
                vocab_size: int, mask_id: int, rate: float = 0.15, mask_prob: float = 0.8,
                random_prob: float = 0.1, num_predictions: int | None = None
                ) -> dict[str, np.ndarray]:
  """BERT's masking of a batch.

  Args:
    tokens: `[batch, seq]` int32; ids < num_special (padding, BOS, EOS, ...) are never chosen.
    rng: numpy generator (the only randomness).
    num_special: ids [0, num_special) are special; random replacements come from
      [num_special, vocab_size).
    vocab_size, mask_id: the vocabulary and the [MASK] id.
    rate: share of non-special tokens chosen; mask_prob / random_prob: of a chosen token, the
      probability of [MASK] / of a random token (the rest stay unchanged).
    num_predictions: prediction slots per row (default `max_predictions(seq, rate)`).

  Returns:
    {'tokens': `[batch, seq]` corrupted input, 'positions': `[batch, P]` int32 chosen positions
     (slots past a row's count point at 0), 'labels': `[batch, P]` int32 original tokens there,
     'weights': `[batch, P]` float32, 1 for a real slot, 0 for an empty one}.
  """
  batch, seq = tokens.shape
  num_predictions = num_predictions or max_predictions(seq, rate)
  candidate = tokens >= num_special
  count = candidate.sum(axis=1)
  chosen = np.floor(rate * count + rng.random(batch)).astype(np.int64)
  chosen = np.minimum(chosen, num_predictions)
  # A random order of each row's candidates (non-candidates sort last): its first `chosen`.
  keys = np.where(candidate, rng.random((batch, seq)), 2.0)
  order = np.argsort(keys, axis=1, kind='stable')
  width = min(num_predictions, seq)
  weights = np.zeros((batch, num_predictions), np.float32)
  weights[:, :width] = np.arange(width)[None, :] < chosen[:, None]
  positions = np.zeros((batch, num_predictions), np.int32)
  positions[:, :width] = np.where(weights[:, :width] > 0, order[:, :width], 0)
  rows = np.arange(batch)[:, None]
  labels = np.where(weights > 0, tokens[rows, positions], 0).astype(np.int32)

  action = rng.random((batch, num_predictions))
  random_ids = rng.integers(num_special, vocab_size, (batch, num_predictions))
  new = np.where(action < mask_prob, mask_id,
                 np.where(action < mask_prob + random_prob, random_ids, labels))
  corrupted = tokens.copy()
  real = weights > 0
  corrupted[np.broadcast_to(rows, positions.shape)[real], positions[real]] = new[real]
  return {'tokens': corrupted, 'positions': positions, 'labels': labels, 'weights': weights}


class MaskedSentences:
  """Batches of masked padded sentences; `batch(step)` is a pure function of (seed, step)."""

  def __init__(self, sentences: np.ndarray, *, global_batch_size: int, seed: int,
               mask_kwargs: dict, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1):
    """sentences: `[N, max_len]` from `pad_sentences`; mask_kwargs: `mask_tokens` arguments
    besides tokens and rng; shuffle=False keeps file order (evaluation)."""
    if global_batch_size < 1 or global_batch_size % process_count:
      raise UserError(f'batch_size={global_batch_size} must be a positive multiple of the '
                      f'process count {process_count}: change --config.batch_size.')
    if seed < 0:
      raise UserError(f'seed={seed} must be non-negative: change --config.seed.')
    if not len(sentences):
      raise UserError('no sentences to batch (empty split)')
    self.sentences = sentences
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.mask_kwargs = mask_kwargs
    self.shuffle = shuffle
    self.process_index = process_index

  @functools.lru_cache(maxsize=4)
  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(len(self.sentences))
    return np.random.default_rng((self.seed, epoch)).permutation(len(self.sentences))

  def indices(self, step: int) -> np.ndarray:
    """`[global_batch]` sentence indices of `step` (epochs run on, without a partial batch)."""
    flat = step * self.global_batch_size + np.arange(self.global_batch_size)
    epochs, within = np.divmod(flat, len(self.sentences))
    return np.array([self._order(int(e))[i] for e, i in zip(epochs, within)])

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch at `step` (see `mask_tokens` for the keys)."""
    tokens = self.sentences[self.indices(step)]
    masked = mask_tokens(tokens, np.random.default_rng((self.seed, step)), **self.mask_kwargs)
    lo = self.process_index * self.local_batch_size
    return {k: np.ascontiguousarray(v[lo:lo + self.local_batch_size]) for k, v in masked.items()}

  def eval_batches(self, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Every sentence once, in order, masked with the generator of (seed, batch index); the last
    batch is filled with all-padding rows, which have no prediction slots."""
    n, b = len(self.sentences), self.global_batch_size
    out = []
    for i, lo in enumerate(range(0, n, b)):
      tokens = self.sentences[lo:lo + b]
      if len(tokens) < b:
        fill = np.full((b - len(tokens), tokens.shape[1]), pad_id, np.int32)
        tokens = np.concatenate([tokens, fill])
      masked = mask_tokens(tokens, np.random.default_rng((self.seed, i)), **self.mask_kwargs)
      start = self.process_index * self.local_batch_size
      out.append({k: v[start:start + self.local_batch_size] for k, v in masked.items()})
    return out
