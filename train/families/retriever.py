"""The dense retriever family: a bi-encoder trained contrastively on the knowledge task.

Network: `models.bert.BERT`'s encoder (its MLM head is kept but unused, so `config.init_from`
can start from a BERT run: same param paths), shared by questions and passages, mean-pooled and
normalised (models/retriever.py).

Data (train/knowledge.py, sizes and seed in config.data): each step takes `batch_size` distinct
facts of the train entities, each as (one of its questions, phrasing drawn at random; its gold
document). Loss: softmax cross-entropy of each question over the batch's passages (in-batch
negatives) at `config.temperature`. With `config.hard_negatives=True` each row also brings one
hard negative, scored by every question of the batch (DPR's setup, Karpukhin et al. 2020): one
of the person's mention documents (their name, no fact) or the document stating the same
attribute of another train person who shares the first or the last name (the confusions of a
retriever that matches names or wording alone), never a document that is some row's gold. The
batch is a pure function of (seed, step). The subword tokenizer is trained on every document
and the train questions, or, with `config.init_from`, is the base run's (its ids are the base's
embedding rows).

The loop's eval: the same loss and in-batch accuracy on val facts (one phrasing each).
`python -m train.evaluate --workdir=DIR [--split=val|test] [--batch=256] [--report=PATH]`:
recall@1 and @5 of the split's questions over the whole collection (every document of every
split), for the dense index (built once per checkpoint, saved as DIR/index/dense_step<S>.npz,
reused when its fingerprint matches) and for BM25 on the same questions, written to
DIR/eval/retrieval_<split>_step<S>.json.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import bert as bert_lib
from models import retriever as retriever_lib
from train import knowledge
from train import storage
from train import text as text_lib
from train import tune
from train import retrieval
from train.errors import UserError
from train.family import Family
from train.families import bert as bert_family

RECALL_AT = (1, 5)


class RetrieverFamily(Family):
  """config.model: max_len (tokens per question or passage, BOS and EOS included), num_layers,
  num_heads, embed_dim, dropout, init_std, attention, dtype (as the BERT family's).
  config.data: task_seed, num_entities, val_entities, test_entities, mentions
  (train/knowledge.py), vocab_size. config.temperature: of the in-batch softmax (embeddings
  have unit length). config.hard_negatives: one hard negative passage per row (module docstring)."""

  name = 'retriever'
  unit = 'pairs'
  evaluate_flags = ('split', 'batch', 'report')

  def __init__(self, config):
    super().__init__(config)
    bert_family.check_encoder_config(config.model)
    if not config.temperature > 0:
      raise UserError(f'config.temperature={config.temperature}: must be > 0')
    d = config.data
    knowledge.check_sizes(d.num_entities, d.val_entities, d.test_entities)
    self.collection: knowledge.Collection | None = None
    self.tokenizer: text_lib.SubwordTokenizer | None = None

  # ---- data ----
  def _train_tokenizer(self) -> text_lib.SubwordTokenizer:
    base = str(self.config.get('init_from') or '')
    if base:  # the base's ids are its embedding rows
      return text_lib.load_from_workdir(tune.parse_init_from(base)[0])
    texts = self.collection.passages + [q.text for q in self.collection.questions_of('train')]
    try:
      return text_lib.SubwordTokenizer.train(texts, self.config.data.vocab_size)
    except ValueError as e:
      raise UserError(f'config.data.vocab_size: {e}') from None

  def pad(self, texts) -> np.ndarray:
    return retrieval.pad_texts(self.tokenizer, texts, self.config.model.max_len)

  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    if c.batch_size % process_count:
      raise UserError(f'config.batch_size={c.batch_size} must be a multiple of the process '
                      f'count {process_count}')
    self.collection = knowledge.from_config(c.data)
    self.tokenizer = self._train_tokenizer()
    self._passages = self.pad(self.collection.passages)  # [num_documents, max_len]
    self._train = _FactPairs(self.collection.questions_of('train'), self.pad)
    if c.get('hard_negatives'):
      self._confusable = confusable_documents(self.collection, self._train.gold)
    if c.batch_size > len(self._train.gold):
      raise UserError(f'config.batch_size={c.batch_size} exceeds the {len(self._train.gold)} '
                      'train facts (a batch holds distinct facts): lower it')
    self._rows = slice(process_index * c.batch_size // process_count,
                       (process_index + 1) * c.batch_size // process_count)
    val = _FactPairs(self.collection.questions_of('val'), self.pad)
    # Val facts in a seeded order (one phrasing each, in turn), in whole batches.
    order = np.random.default_rng(c.seed + 1).permutation(len(val.gold))
    n = len(order) // c.batch_size * c.batch_size
    if not n:
      raise UserError(f'config.batch_size={c.batch_size} exceeds the {len(order)} val facts '
                      '(evaluation uses whole batches): lower it or add val_entities')
    self._eval = [self._pair_batch(val, order[lo:lo + c.batch_size],
                                   order[lo:lo + c.batch_size] % val.phrasings)
                  for lo in range(0, n, c.batch_size)]

  def _pair_batch(self, pairs: _FactPairs, facts: np.ndarray, phrasing: np.ndarray
                  ) -> dict[str, np.ndarray]:
    facts, phrasing = facts[self._rows], phrasing[self._rows]
    return {'question': pairs.questions[facts, phrasing],
            'passage': self._passages[pairs.gold[facts]]}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    n, b = len(self._train.gold), self.config.batch_size
    per_epoch = n // b
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng((self.config.seed, epoch)).permutation(n)
    facts = order[index * b:(index + 1) * b]
    phrasing = np.random.default_rng((self.config.seed, epoch, index, 1)).integers(
        self._train.phrasings, size=b)
    batch = self._pair_batch(self._train, facts, phrasing)
    if self.config.get('hard_negatives'):
      rng = np.random.default_rng((self.config.seed, epoch, index, 2))
      negatives = hard_negatives(self._confusable, self._train.gold, facts, rng)
      batch['negative'] = self._passages[negatives[self._rows]]
    return batch

  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return self._eval

  def metadata(self) -> dict[str, Any]:
    return {'vocab_size': self.tokenizer.vocab_size}

  def load_metadata(self, metadata: dict[str, Any]) -> None:
    self._vocab_size = metadata['vocab_size']

  def write_run_files(self, workdir: str) -> None:
    text_lib.save_in_workdir(self.tokenizer, workdir)
    knowledge.write_run_file(storage.join(workdir, knowledge.RUN_FILE),
                             self.collection.to_json())

  def read_run_files(self, workdir: str) -> None:
    self.tokenizer = text_lib.load_from_workdir(workdir)
    if self.tokenizer.vocab_size != self._vocab_size:
      raise UserError(f'{workdir}/{text_lib.TOKENIZER_FILE}: vocabulary of '
                      f'{self.tokenizer.vocab_size} tokens, but the run was trained with '
                      f'{self._vocab_size} (family.json)')
    self.collection = knowledge.read_collection(workdir)

  # ---- model and loss ----
  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    return {'model': bert_family.build_encoder(self.config.model, self.tokenizer.vocab_size,
                                               rngs)}

  def loss(self, models, batch, rng, *, train: bool):
    keys = jax.random.split(rng, 3) if train else (None,) * 3
    encoder = models['model']
    q = retriever_lib.embed(encoder, batch['question'], dropout_key=keys[0])
    p = retriever_lib.embed(encoder, batch['passage'], dropout_key=keys[1])
    if 'negative' in batch:   # scored by every question after the batch's gold passages
      p = jnp.concatenate([p, retriever_lib.embed(encoder, batch['negative'],
                                                  dropout_key=keys[2])])
    loss, accuracy = retriever_lib.in_batch_contrastive_loss(q, p, self.config.temperature)
    return loss, {'in_batch_accuracy': accuracy}

  def items_per_step(self) -> int:
    return self.config.batch_size

  # ---- retrieval ----
  def dense_index(self, encoder: bert_lib.BERT, workdir: str, step: int, batch: int = 256
                  ) -> retrieval.DenseIndex:
    """The index of every document under checkpoint `step`: read from DIR/index/ when it was
    built by this encoder and tokenizer, else built and saved there."""
    path = storage.join(workdir, 'index', f'dense_step{step}.npz')
    max_len = self.config.model.max_len
    if storage.isfile(path):
      return retrieval.DenseIndex.load(path, retrieval.fingerprint(encoder, self.tokenizer,
                                                                   max_len))
    index = retrieval.DenseIndex.build(encoder, self.tokenizer, self.collection.passages,
                                       max_len, batch)
    index.save(path)
    return index

  def retriever(self, name: str, encoder: bert_lib.BERT | None = None,
                index: retrieval.DenseIndex | None = None) -> retrieval.Retriever:
    """A retriever over this run's collection by name ('bm25', 'dense')."""
    return retrieval.make_retriever(name, passages=self.collection.passages, encoder=encoder,
                                    tokenizer=self.tokenizer, max_len=self.config.model.max_len,
                                    index=index)

  def evaluate(self, models, workdir: str, step: int, options: dict[str, Any]) -> str:
    split = options.get('split') or 'val'
    if split not in ('val', 'test', 'train'):
      raise UserError(f'--split={split}: the knowledge task has train, val and test')
    batch = options.get('batch') or 256
    questions = self.collection.questions_of(split)
    texts = [q.text for q in questions]
    gold = np.array([q.gold_document for q in questions])
    report = {'workdir': storage.absolute(workdir), 'family': self.name,
              'checkpoint_step': step, 'split': split, 'questions': len(questions),
              'passages': len(self.collection.documents)}
    start = time.perf_counter()
    index = self.dense_index(models['model'], workdir, step, batch)
    report['index_seconds'] = time.perf_counter() - start
    for name in retrieval.RETRIEVERS:
      retriever = self.retriever(name, models['model'], index)
      start = time.perf_counter()
      ids, _ = retriever.retrieve(texts, max(RECALL_AT))
      report[name] = {**retrieval.recall_at(ids, gold, RECALL_AT),
                      'questions_per_s': len(texts) / (time.perf_counter() - start)}
    path = options.get('report') or storage.join(workdir, 'eval',
                                                 f'retrieval_{split}_step{step}.json')
    storage.write_text(path, json.dumps(report, indent=1))
    lines = [f'{self.name} step {step}, {split}: {len(texts)} questions over '
             f'{report["passages"]} passages']
    lines += [f'  {n}: ' + '  '.join(f'recall@{k} {report[n][f"recall@{k}"]:.3f}'
                                     for k in RECALL_AT) for n in retrieval.RETRIEVERS]
    return '\n'.join(lines + [f'wrote {path}'])


def confusable_documents(collection: knowledge.Collection, gold: np.ndarray
                         ) -> list[np.ndarray]:
  """For each fact (its gold document `gold[f]`, a document of a train person), the ids of the
  documents a name-blind retriever confuses with it: the person's own mention documents (their
  name, none of the facts) and the same attribute of other train people sharing the first or
  the last name; when no one shares either, the same attribute of every other train person."""
  docs = collection.documents
  facts = [docs[g] for g in gold]
  entity = np.array([d.entity for d in facts])
  attribute = np.array([d.attribute for d in facts])
  names = [collection.entities[d.entity].name.split() for d in facts]
  first = np.unique([n[0] for n in names], return_inverse=True)[1]
  last = np.unique([n[-1] for n in names], return_inverse=True)[1]
  mentions: dict[int, list[int]] = {}
  for d in docs:
    if d.attribute == knowledge.MENTION:
      mentions.setdefault(d.entity, []).append(d.id)
  out = []
  for f, d in enumerate(facts):
    others = (attribute == attribute[f]) & (entity != entity[f])
    shared = others & ((first == first[f]) | (last == last[f]))
    out.append(np.concatenate([np.array(mentions.get(d.entity, []), np.int64),
                               gold[np.flatnonzero(shared if shared.any() else others)]]))
  return out


def hard_negatives(confusable: list[np.ndarray], gold: np.ndarray, facts: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
  """One negative document id per row of `facts`: drawn from its `confusable` documents that
  are no row's gold document (else from the train facts' gold documents that are not), so no
  question meets its gold passage twice."""
  taken = set(gold[facts].tolist())
  out = np.empty(len(facts), dtype=np.int64)
  for i, f in enumerate(facts):
    pool = [d for d in confusable[f].tolist() if d not in taken]
    if not pool:
      pool = [d for d in gold.tolist() if d not in taken]
    out[i] = pool[rng.integers(len(pool))]
  return out


class _FactPairs:
  """A split's facts: every phrasing of each fact's question (padded) and its gold document."""

  def __init__(self, questions: list[knowledge.Question], pad):
    by_fact: dict[tuple[int, str], list[knowledge.Question]] = {}
    for q in questions:
      by_fact.setdefault((q.entity, q.attribute), []).append(q)
    facts = list(by_fact.values())
    self.phrasings = len(facts[0])
    if any(len(f) != self.phrasings for f in facts):
      raise ValueError('every fact needs the same number of question phrasings')
    tokens = pad([q.text for f in facts for q in f])
    self.questions = tokens.reshape(len(facts), self.phrasings, -1)  # [facts, phrasings, len]
    self.gold = np.array([f[0].gold_document for f in facts])        # [facts]
