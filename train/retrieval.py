"""Retrievers over a fixed list of passages: BM25 (the `bm25s` library) and a dense bi-encoder.

Every retriever answers `retrieve(questions, top_k) -> (passage ids [n, top_k] int32, scores
[n, top_k] float32)`, best first, ids being positions in the passage list it was built on (for
the knowledge task, `train.knowledge` document ids). `make_retriever(name, ...)` builds one by
name ('bm25', 'dense').

The dense index is built once, by encoding every passage, and searched by exact inner product
(`models.retriever.top_k_inner_product`). It is saved with a fingerprint of the tokenizer and of
the encoder's params; an index whose fingerprint differs from the encoder that embeds the
questions is refused (its vectors would live in another space).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from typing import Protocol, Sequence

import bm25s
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import bert as bert_lib
from models import retriever as retriever_lib
from train import mlm
from train import storage
from train import text as text_lib
from train.errors import UserError

RETRIEVERS = ('bm25', 'dense')


class Retriever(Protocol):
  name: str
  num_passages: int

  def retrieve(self, questions: Sequence[str], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(passage ids `[n, top_k]` int32, scores `[n, top_k]` float32), best first."""


def check_request(questions: Sequence[str], top_k: int, num_passages: int) -> None:
  """UserError for an empty question or a top_k outside [1, num_passages]."""
  if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_passages:
    raise UserError(f'--top_k={top_k}: must be in [1, {num_passages}] (the passages indexed)')
  for i, q in enumerate(questions):
    if not isinstance(q, str) or not q.strip():
      raise UserError(f'question {i} is empty ({q!r}): ask something, e.g. '
                      '"Where was Ilsa Marrow born?"')


def make_retriever(name: str, **kwargs) -> Retriever:
  """'bm25': `BM25Retriever(passages)`; 'dense': `DenseRetriever(encoder, tokenizer, max_len,
  index)`; another name is a UserError."""
  if name == 'bm25':
    return BM25Retriever(kwargs['passages'])
  if name == 'dense':
    return DenseRetriever(kwargs['encoder'], kwargs['tokenizer'], kwargs['max_len'],
                          kwargs['index'])
  raise UserError(f'--retriever={name!r}: unknown retriever (known: {", ".join(RETRIEVERS)})')


class BM25Retriever:
  """Okapi BM25 (bm25s's defaults: Lucene's variant, k1 = 1.5, b = 0.75) over lower-cased word
  tokens with English stopwords removed."""

  name = 'bm25'

  def __init__(self, passages: Sequence[str]):
    self.num_passages = len(passages)
    self._bm25 = bm25s.BM25()
    self._bm25.index(bm25s.tokenize(list(passages), stopwords='en', show_progress=False),
                     show_progress=False)

  def retrieve(self, questions: Sequence[str], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    check_request(questions, top_k, self.num_passages)
    tokens = bm25s.tokenize(list(questions), stopwords='en', return_ids=False,
                            show_progress=False)
    ids, scores = self._bm25.retrieve(tokens, k=top_k, show_progress=False)
    return np.asarray(ids, np.int32), np.asarray(scores, np.float32)


# ---------------------------------------------------------------------------------------------
# Dense.
# ---------------------------------------------------------------------------------------------
def pad_texts(tokenizer: text_lib.SubwordTokenizer, texts: Sequence[str], max_len: int
              ) -> np.ndarray:
  """`[len(texts), max_len]` int32: [BOS] ids [EOS] [PAD]... (cut to fit, [EOS] kept)."""
  return mlm.pad_sentences(tokenizer.encode_batch(list(texts)), max_len, bos_id=text_lib.BOS_ID,
                           eos_id=text_lib.EOS_ID, pad_id=text_lib.PAD_ID)


def encode_tokens(encoder: bert_lib.BERT, tokens: np.ndarray, batch: int = 256) -> np.ndarray:
  """Unit-length embeddings `[n, dim]` float32 of padded `tokens` `[n, seq]`, `batch` rows at a
  time (the last batch padded: one compilation)."""
  graphdef, state = nnx.split(encoder)
  out = []
  for lo in range(0, len(tokens), batch):
    chunk = tokens[lo:lo + batch]
    pad = batch - len(chunk) if len(tokens) > batch else 0
    chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
    out.append(np.asarray(_embed(graphdef, state, jnp.asarray(chunk)))[:len(chunk) - pad])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, tokens):
  return retriever_lib.embed(nnx.merge(graphdef, state), tokens)


def fingerprint(encoder: bert_lib.BERT, tokenizer: text_lib.SubwordTokenizer, max_len: int
                ) -> dict[str, str]:
  """SHA-256 of the tokenizer file and of the encoder's params (and max_len)."""
  h = hashlib.sha256(f'max_len={max_len}'.encode())
  params = jax.tree_util.tree_flatten_with_path(jax.device_get(nnx.state(encoder, nnx.Param)))[0]
  for path, x in params:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return {'tokenizer': hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
          'encoder': h.hexdigest()}


class DenseIndex:
  """Unit-length passage embeddings `[num_passages, dim]` and the fingerprint of what made them."""

  def __init__(self, embeddings: np.ndarray, made_by: dict[str, str]):
    self.embeddings = np.asarray(embeddings, np.float32)
    self.made_by = dict(made_by)

  @classmethod
  def build(cls, encoder: bert_lib.BERT, tokenizer: text_lib.SubwordTokenizer,
            passages: Sequence[str], max_len: int, batch: int = 256) -> DenseIndex:
    """Encodes every passage once."""
    return cls(encode_tokens(encoder, pad_texts(tokenizer, passages, max_len), batch),
               fingerprint(encoder, tokenizer, max_len))

  def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids `[n, top_k]` int32, inner products `[n, top_k]` float32) of query embeddings."""
    scores, ids = jax.jit(retriever_lib.top_k_inner_product, static_argnums=2)(
        jnp.asarray(queries), jnp.asarray(self.embeddings), top_k)
    return np.asarray(ids), np.asarray(scores)

  def save(self, path: str) -> None:
    """`path` (.npz) holding the embeddings and the fingerprint, written whole or not at all."""
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=self.embeddings, made_by=json.dumps(self.made_by))
    storage.write_bytes(path, buffer.getvalue())

  @classmethod
  def load(cls, path: str, expected: dict[str, str]) -> DenseIndex:
    """The index at `path`; UserError when it is damaged or was built with another tokenizer or
    encoder than `expected` (a `fingerprint`)."""
    try:
      with np.load(io.BytesIO(storage.read_bytes(path))) as f:
        index = cls(f['embeddings'], json.loads(str(f['made_by'])))
    except Exception as e:  # pylint: disable=broad-except (numpy raises many kinds)
      raise UserError(f'{path}: damaged index ({type(e).__name__}); delete it to rebuild it'
                      ) from None
    for what in ('tokenizer', 'encoder'):
      if index.made_by.get(what) != expected[what]:
        raise UserError(f'{path}: built with another {what} than this run\'s (fingerprint '
                        f'{str(index.made_by.get(what))[:12]} vs {expected[what][:12]}); '
                        'delete it to rebuild it with this run\'s')
    return index


class DenseRetriever:
  """Questions embedded by `encoder`, searched in a `DenseIndex` built by the same encoder."""

  name = 'dense'

  def __init__(self, encoder: bert_lib.BERT, tokenizer: text_lib.SubwordTokenizer,
               max_len: int, index: DenseIndex):
    made_by = fingerprint(encoder, tokenizer, max_len)
    for what in ('tokenizer', 'encoder'):
      if index.made_by.get(what) != made_by[what]:
        raise UserError(f'dense index: built with another {what} than the one that embeds the '
                        'questions; rebuild it with this run\'s')
    self.encoder, self.tokenizer, self.max_len, self.index = encoder, tokenizer, max_len, index
    self.num_passages = len(index.embeddings)

  def retrieve(self, questions: Sequence[str], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    check_request(questions, top_k, self.num_passages)
    queries = encode_tokens(self.encoder, pad_texts(self.tokenizer, questions, self.max_len))
    return self.index.search(queries, top_k)


def recall_at(ids: np.ndarray, gold: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
  """{'recall@k': share of rows whose gold id is among their first k ids} for each k."""
  hits = ids == np.asarray(gold)[:, None]  # [n, top_k]
  return {f'recall@{k}': float(hits[:, :k].any(1).mean()) for k in ks}
