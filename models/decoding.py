"""Search over any autoregressive decoder with a cache: greedy search and beam search.

A decoder plugs in as `step_fn(tokens, index, cache) -> (logits, cache)`: `tokens` [N] int32
are fed at position `index` (0 is BOS) and the logits [N, vocab] score the next token; `cache`
is any pytree whose leaves have leading dimension N (a KV cache). Whatever stays fixed during
the search (encoder outputs, cross-attention keys/values) is closed over by `step_fn` instead:
beam search reorders only the cache. Both searches are `lax.while_loop`s that stop as soon as
the result is settled, so they run inside `jax.jit`.

Scores are the model's own log probabilities: `banned_ids` (e.g. PAD, BOS) are never
generated, but the softmax is not renormalised without them. Lengths count generated tokens,
EOS included (BOS is not generated). A hypothesis that reaches
`max_len` tokens without EOS ends there and is scored at that length.

Beam search scores a finished hypothesis y by log P(y | x) / lp(|y|) with GNMT's length penalty
lp(n) = ((5 + n) / 6) ** alpha (Wu et al. 2016, eq. 14; alpha = `length_penalty`, 0 = raw log
probability). Each step it expands the `beam` live hypotheses by every token and ranks the
candidates by log probability. Those among the best `beam` that end with EOS finish (the finished
set keeps its best `beam`); the best `beam` candidates that do not end with EOS stay live (taken
from the best 2 * beam, which always holds enough), so the beam never shrinks. It stops when no
live hypothesis can still beat the worst finished one: with alpha >= 0 and log probabilities
only falling, a live hypothesis scores at most (its log probability) / lp(max_len). Only an EOS
that would have held a beam slot finishes, so with beam 1 and alpha = 0 the result is exactly
greedy search's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
_NEG_INF = -1e30  # "impossible" score (finite: arithmetic on it stays NaN-free)


def gnmt_length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """lp(n) = ((5 + n) / 6) ** alpha (Wu et al. 2016)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _log_probs(logits: jax.Array, banned_ids: Sequence[int]) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if banned_ids:
    logp = logp.at[..., jnp.asarray(banned_ids)].set(_NEG_INF)
  return logp


def greedy_search(step_fn: StepFn, cache: Any, *, batch_size: int, max_len: int, bos_id: int,
                  eos_id: int, pad_id: int, banned_ids: Sequence[int] = ()
                  ) -> tuple[jax.Array, jax.Array]:
  """The most likely token at every step.

  Returns:
    (tokens [batch, max_len] int32, EOS included and `pad_id` after it;
     log probability [batch] float32 of each sequence).
  """
  def cond(state):
    i, _, _, done, _, _ = state
    return (i < max_len) & ~done.all()

  def body(state):
    i, last, tokens, done, score, cache = state
    logits, cache = step_fn(last, i, cache)
    logp = _log_probs(logits, banned_ids)
    token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    score = score + jnp.where(done, 0.0, jnp.take_along_axis(logp, token[:, None], -1)[:, 0])
    token = jnp.where(done, pad_id, token)
    tokens = tokens.at[:, i].set(token)
    return i + 1, token, tokens, done | (token == eos_id), score, cache

  state = (jnp.zeros((), jnp.int32), jnp.full((batch_size,), bos_id, jnp.int32),
           jnp.full((batch_size, max_len), pad_id, jnp.int32), jnp.zeros((batch_size,), bool),
           jnp.zeros((batch_size,), jnp.float32), cache)
  _, _, tokens, _, score, _ = lax.while_loop(cond, body, state)
  return tokens, score


def beam_search(step_fn: StepFn, cache: Any, *, batch_size: int, beam_size: int, max_len: int,
                bos_id: int, eos_id: int, pad_id: int, length_penalty: float = 0.6,
                banned_ids: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
  """Beam search with GNMT's length penalty (see the module docstring).

  Args:
    step_fn: the decoder (see the module docstring), on N = batch_size * beam_size rows;
      row b * beam_size + j is beam j of sentence b.
    cache: its initial cache with leading dimension N (e.g. each sentence's repeated).
    length_penalty: alpha >= 0.
    banned_ids: tokens never generated (e.g. PAD, BOS).

  Returns:
    (tokens [batch, beam, max_len] int32, best first, EOS included and `pad_id` after it;
     scores [batch, beam] float32, log P / lp(length)).
  """
  if beam_size < 1:
    raise ValueError(f'beam_size={beam_size} must be >= 1')
  if length_penalty < 0:
    raise ValueError(f'length_penalty={length_penalty} must be >= 0')
  b, k = batch_size, beam_size
  rows = jnp.arange(b)[:, None]

  def reorder(tree, beam_index):
    """Rows of every cache leaf follow their parent beams: beam_index [b, k]."""
    def one(x):
      x = x.reshape((b, k) + x.shape[1:])[rows, beam_index]
      return x.reshape((b * k,) + x.shape[2:])
    return jax.tree.map(one, tree)

  def cond(state):
    i, alive_seq, alive_lp, fin_seq, fin_score, cache = state
    best_possible = alive_lp.max(-1) / gnmt_length_penalty(max_len, length_penalty)
    settled = fin_score.min(-1) > best_possible
    return (i < max_len) & ~settled.all()

  def body(state):
    i, alive_seq, alive_lp, fin_seq, fin_score, cache = state
    last = jnp.where(i == 0, bos_id, alive_seq[:, :, jnp.maximum(i - 1, 0)])
    logits, cache = step_fn(last.reshape(b * k), i, cache)
    logp = _log_probs(logits, banned_ids).reshape(b, k, -1)
    vocab = logp.shape[-1]
    cand_lp, flat = lax.top_k((alive_lp[:, :, None] + logp).reshape(b, k * vocab), 2 * k)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand_seq = alive_seq[rows, parent].at[:, :, i].set(token)  # [b, 2k, max_len]
    ends = token == eos_id
    last_step = i == max_len - 1  # every candidate ends here, EOS or not
    in_beam = jnp.arange(2 * k) < k  # the candidates that would hold a beam slot
    cand_score = jnp.where((ends | last_step) & in_beam,
                           cand_lp / gnmt_length_penalty(i + 1, length_penalty), _NEG_INF)
    cand_score = jnp.where(cand_lp <= _NEG_INF / 2, _NEG_INF, cand_score)  # children of void
    fin_score, pick = lax.top_k(jnp.concatenate([fin_score, cand_score], 1), k)
    fin_seq = jnp.concatenate([fin_seq, cand_seq], 1)[rows, pick]
    alive_lp, pick = lax.top_k(jnp.where(ends, _NEG_INF, cand_lp), k)
    alive_seq = cand_seq[rows, pick]
    cache = reorder(cache, parent[rows, pick])
    return i + 1, alive_seq, alive_lp, fin_seq, fin_score, cache

  # Only beam 0 is live at the start, so the first expansion does not repeat hypotheses.
  alive_lp = jnp.tile(jnp.asarray([0.0] + [_NEG_INF] * (k - 1), jnp.float32), (b, 1))
  seqs = jnp.full((b, k, max_len), pad_id, jnp.int32)
  state = (jnp.zeros((), jnp.int32), seqs, alive_lp, seqs,
           jnp.full((b, k), _NEG_INF, jnp.float32), cache)
  _, _, _, fin_seq, fin_score, _ = lax.while_loop(cond, body, state)
  return fin_seq, fin_score
