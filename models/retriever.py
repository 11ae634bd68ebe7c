"""Dense retrieval on a transformer encoder: pooled embeddings, in-batch contrastive loss, top-k.

The encoder is `models.bert.BERT` (its `encode`, without the MLM head), so a retriever can start
from a BERT run's params. One encoder embeds both questions and passages (shared weights, as in
sentence-transformers' bi-encoders; DPR, Karpukhin et al. 2020, trains two): an embedding is
the mean of the final hidden states over the real (non-padding) tokens, [BOS] and [EOS]
included, normalised to unit length, so an inner product is a cosine similarity and the
temperature alone sets how sharp the softmax over passages is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from models import bert as bert_lib


def mean_pool(hidden: jax.Array, valid: jax.Array) -> jax.Array:
  """hidden `[batch, seq, dim]`, valid `[batch, seq]` bool -> `[batch, dim]` float32 means
  over the valid positions."""
  w = valid.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def embed(encoder: bert_lib.BERT, tokens: jax.Array, *,
          dropout_key: jax.Array | None = None) -> jax.Array:
  """tokens `[batch, seq]` (padded with the encoder's pad_id) -> unit-length float32
  embeddings `[batch, dim]`."""
  batch, seq = tokens.shape
  hidden = encoder.encode(tokens, dropout_key=dropout_key).reshape(batch, seq, -1)
  pooled = mean_pool(hidden, tokens != encoder.pad_id)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-6)


def in_batch_contrastive_loss(questions: jax.Array, passages: jax.Array, temperature: float
                              ) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy of each question over the batch's passages, its own one the target.

  questions `[batch, dim]`, passages `[batch + extra, dim]`: row i of `passages` is question
  i's gold passage, every other row (the other questions' gold passages, then any `extra` hard
  negatives) a negative. Returns (mean loss, share of questions whose gold passage scores
  highest). With identical embeddings every logit is equal and the loss is log(batch + extra).
  """
  logits = questions @ passages.T / temperature  # [batch, batch + extra]
  labels = jnp.arange(questions.shape[0])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32).mean()
  return loss, accuracy


def top_k_inner_product(queries: jax.Array, index: jax.Array, k: int, chunk: int = 256
                        ) -> tuple[jax.Array, jax.Array]:
  """Exact top-k of `queries @ index.T`, `chunk` queries at a time (the full score matrix
  `[num_queries, num_passages]` is never held at once).

  queries `[n, dim]`, index `[num_passages, dim]` -> (scores `[n, k]` float32 descending,
  passage ids `[n, k]` int32). Ties go to the lower id (`jax.lax.top_k`).
  """
  if not 1 <= k <= index.shape[0]:
    raise ValueError(f'k={k} must be in [1, {index.shape[0]}] (the passages in the index)')
  n = queries.shape[0]
  chunk = max(1, min(chunk, n))
  pad = -n % chunk
  padded = jnp.pad(queries.astype(jnp.float32), ((0, pad), (0, 0)))
  blocks = padded.reshape(-1, chunk, queries.shape[1])  # [n_chunks, chunk, dim]
  index = index.astype(jnp.float32)
  scores, ids = jax.lax.map(lambda q: jax.lax.top_k(q @ index.T, k), blocks)
  return scores.reshape(-1, k)[:n], ids.reshape(-1, k)[:n].astype(jnp.int32)
