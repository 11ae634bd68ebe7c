"""Retrieval: the knowledge task's records, exact top-k, the contrastive loss, BM25, the dense
retriever's bad input, and an exactly resumed bi-encoder run with its recall report (tiny, CPU).
"""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp

from experiments.configs import retriever_knowledge
from models import bert as bert_lib
from models import retriever as retriever_lib
from tests.test_sharding import assert_resumed_exactly
from train import knowledge
from train import loop
from train import retrieval
from train import run_loader
from train import text
from train.families import retriever as retriever_family
from train.errors import UserError


# ------------------------------------------------------------------------------ knowledge task


@pytest.fixture(scope='module')
def collection():
  return knowledge.generate(seed=3, num_entities=60, val_entities=8, test_entities=8,
                            mentions=2)


def test_answers_are_in_exactly_the_documents_that_state_them(collection):
  entities, docs = collection.entities, collection.documents
  assert len(docs) == 60 * (len(knowledge.ATTRIBUTES) + 2)   # 2 mention documents each
  assert sorted(d.id for d in docs) == list(range(len(docs)))
  contains = lambda t, s: re.search(r'(?<!\w)' + re.escape(s) + r'(?!\w)', t) is not None
  # A value (town, year, job, company, instrument) is written in exactly the documents whose
  # record states it, and nowhere else (no template word or other value contains it).
  for value in {v for e in entities for v in e.facts.values()}:
    written = {d.id for d in docs if contains(d.text, value)}
    stated = {d.id for d in docs if entities[d.entity].facts.get(d.attribute) == value}
    assert written == stated, value
  # A question's answer and its person's name are together in exactly one document: its gold.
  for q in collection.questions:
    name = entities[q.entity].name
    assert name in q.text and q.answer == entities[q.entity].facts[q.attribute]
    both = [d.id for d in docs if contains(d.text, name) and contains(d.text, q.answer)]
    assert both == [q.gold_document], q
    assert docs[q.gold_document].entity == q.entity
    assert docs[q.gold_document].attribute == q.attribute
  # Every person is named by their five fact documents and two mention documents (and maybe
  # in others' mention documents, as a friend), and no mention document states a fact.
  for e in entities:
    own = [d for d in docs if d.entity == e.id]
    assert sorted(d.attribute for d in own) == sorted(knowledge.ATTRIBUTES + ('mention',) * 2)
    assert all(contains(d.text, e.name) for d in own)


def test_split_by_entity_and_deterministic(collection):
  splits = {s: {e.id for e in collection.entities if e.split == s} for s in knowledge.SPLITS}
  assert [len(splits[s]) for s in knowledge.SPLITS] == [44, 8, 8]
  names = {s: {collection.entities[i].name for i in ids} for s, ids in splits.items()}
  assert len(set.union(*names.values())) == 60   # unique names, no person in two splits
  train_text = ' '.join(q.text for q in collection.questions_of('train'))
  assert not any(n in train_text for n in names['val'] | names['test'])
  for s in knowledge.SPLITS:
    assert {q.entity for q in collection.questions_of(s)} == splits[s]
  again = knowledge.generate(seed=3, num_entities=60, val_entities=8, test_entities=8,
                             mentions=2)
  assert again.to_json() == collection.to_json()
  # No document about a train person names a val or test person (mentions name friends).
  train_docs = ' '.join(d.text for d in collection.documents
                        if collection.entities[d.entity].split == 'train')
  assert not any(n in train_docs for n in names['val'] | names['test'])
  assert knowledge.Collection.from_json(collection.to_json()) == collection
  other = knowledge.generate(seed=4, num_entities=60, val_entities=8, test_entities=8)
  assert other.passages != collection.passages
  with pytest.raises(UserError, match='at least one entity in each of train, val and test'):
    knowledge.generate(seed=0, num_entities=10, val_entities=5, test_entities=5)
  with pytest.raises(UserError, match='mentions=-1: must be >= 0'):
    knowledge.generate(seed=0, num_entities=10, val_entities=1, test_entities=1, mentions=-1)


# ---------------------------------------------------------------------------- math identities


def test_top_k_equals_brute_force():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(37, 8)).astype(np.float32)
  index = rng.normal(size=(101, 8)).astype(np.float32)
  scores = queries.astype(np.float64) @ index.T.astype(np.float64)
  for k, chunk in ((1, 16), (5, 16), (101, 256)):
    got_scores, got_ids = retriever_lib.top_k_inner_product(jnp.asarray(queries),
                                                            jnp.asarray(index), k, chunk)
    want_ids = np.argsort(-scores, axis=1, kind='stable')[:, :k]
    np.testing.assert_array_equal(np.asarray(got_ids), want_ids)
    np.testing.assert_allclose(np.asarray(got_scores),
                               np.take_along_axis(scores, want_ids, 1), rtol=1e-5, atol=1e-5)
  ids, _ = retrieval.DenseIndex(index, {}).search(queries, 5)
  np.testing.assert_array_equal(ids, np.argsort(-scores, axis=1, kind='stable')[:, :5])
  with pytest.raises(ValueError, match='k=102'):
    retriever_lib.top_k_inner_product(jnp.asarray(queries), jnp.asarray(index), 102)


def test_contrastive_loss_is_log_batch_for_identical_embeddings():
  for batch in (1, 4, 16):
    same = jnp.ones((batch, 6)) / jnp.sqrt(6.0)
    loss, _ = retriever_lib.in_batch_contrastive_loss(same, same, 0.05)
    np.testing.assert_allclose(float(loss), np.log(batch), rtol=1e-6, atol=1e-7)
  # Any embeddings: the mean over questions of logsumexp(row) - row[i] (float64 reference).
  rng = np.random.default_rng(1)
  q, p = rng.normal(size=(2, 8, 5))
  logits = q @ p.T / 0.1
  want = np.mean(logsumexp(logits, axis=1) - np.diag(logits))
  loss, accuracy = retriever_lib.in_batch_contrastive_loss(jnp.asarray(q, jnp.float32),
                                                           jnp.asarray(p, jnp.float32), 0.1)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(accuracy) == np.mean(logits.argmax(1) == np.arange(8))
  # With 3 extra (hard negative) passages: every question is scored over all 11.
  extra = np.concatenate([p, rng.normal(size=(3, 5))])
  logits = q @ extra.T / 0.1
  loss, _ = retriever_lib.in_batch_contrastive_loss(jnp.asarray(q, jnp.float32),
                                                    jnp.asarray(extra, jnp.float32), 0.1)
  np.testing.assert_allclose(float(loss),
                             np.mean(logsumexp(logits, axis=1) - np.diag(logits[:, :8])),
                             rtol=1e-5)
  same = jnp.ones((4, 6)) / jnp.sqrt(6.0)
  loss, _ = retriever_lib.in_batch_contrastive_loss(same, jnp.ones((7, 6)) / jnp.sqrt(6.0), 0.05)
  np.testing.assert_allclose(float(loss), np.log(7), rtol=1e-6)


def test_hard_negatives_are_confusable_and_nobodys_gold(collection):
  train = sorted({q.gold_document for q in collection.questions_of('train')})
  gold = np.array(train)
  confusable = retriever_family.confusable_documents(collection, gold)
  docs, people = collection.documents, collection.entities
  name = lambda d: people[docs[d].entity].name.split()
  for f, pool in enumerate(confusable):
    d = docs[gold[f]]
    # Brute force: the person's mention documents, then the same attribute of other people
    # sharing the first or the last name (of everyone else when no one shares one).
    mentions = [m.id for m in docs if m.entity == d.entity and m.attribute == 'mention']
    others = [g for g in train if docs[g].attribute == d.attribute and docs[g].entity != d.entity]
    shared = [g for g in others if name(g)[0] == name(gold[f])[0]
              or name(g)[-1] == name(gold[f])[-1]]
    assert pool.tolist() == mentions + (shared or others), f
    assert len(mentions) == 2
  sizes = {len(p) for p in confusable}   # both cases occur: 45 = 2 + every other train person
  assert 45 in sizes and min(sizes) < 45
  for seed in range(20):
    facts = np.random.default_rng(seed).permutation(len(gold))[:32]
    negatives = retriever_family.hard_negatives(confusable, gold, facts,
                                                np.random.default_rng((seed, 1)))
    again = retriever_family.hard_negatives(confusable, gold, facts,
                                            np.random.default_rng((seed, 1)))
    np.testing.assert_array_equal(negatives, again)
    taken = set(gold[facts].tolist())
    assert not set(negatives.tolist()) & taken
    for f, n in zip(facts, negatives):
      in_pool = [d for d in confusable[f] if d not in taken]
      assert n in in_pool if in_pool else n in gold


def _tiny_bert(vocab_size, seed=0):
  return bert_lib.BERT(vocab_size=vocab_size, max_len=16, num_layers=1, num_heads=2,
                       embed_dim=8, pad_id=text.PAD_ID, rngs=nnx.Rngs(seed))


def test_embedding_ignores_padding_and_has_unit_length():
  graphdef, state = nnx.split(_tiny_bert(20))
  embed = jax.jit(lambda s, t: retriever_lib.embed(nnx.merge(graphdef, s), t))
  ids = np.array([[1, 7, 9, 11, 2]], np.int32)
  short = embed(state, jnp.asarray(np.pad(ids, ((0, 0), (0, 1)))))
  long = embed(state, jnp.asarray(np.pad(ids, ((0, 0), (0, 11)))))
  np.testing.assert_allclose(np.asarray(short), np.asarray(long), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(long), axis=1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------- retrievers, bad input


def test_bm25_finds_the_gold_documents(collection):
  questions = collection.questions_of('val')
  bm25 = retrieval.make_retriever('bm25', passages=collection.passages)
  ids, scores = bm25.retrieve([q.text for q in questions], top_k=7)
  assert ids.shape == scores.shape == (len(questions), 7)
  assert np.all(np.diff(scores, axis=1) <= 0)
  # Each question names its person, whose seven documents (five facts, two mentions) are the
  # only ones with both names (others' mentions may name them too, as a friend).
  names = [collection.entities[q.entity].name for q in questions]
  top = [collection.documents[i].text for i in ids[:, 0]]
  assert all(n in t for n, t in zip(names, top))
  recall = retrieval.recall_at(ids, np.array([q.gold_document for q in questions]), (1, 5, 7))
  # Paraphrases fool it at 1, the mention documents at 5; at 7 it misses only where other
  # documents share the name's words and the question's (a wrong id mapping would score near
  # 7 / 420).
  assert recall['recall@7'] >= 0.9
  assert recall['recall@1'] < recall['recall@5'] < recall['recall@7']


def test_bad_requests_are_one_line(collection):
  bm25 = retrieval.BM25Retriever(collection.passages)
  with pytest.raises(UserError, match=r"--retriever='tfidf': unknown retriever \(known: bm25, "
                     'dense\\)'):
    retrieval.make_retriever('tfidf', passages=collection.passages)
  with pytest.raises(UserError, match=r'--top_k=0: must be in \[1, 420\]'):
    bm25.retrieve(['Where was Ilsa Marrow born?'], top_k=0)
  with pytest.raises(UserError, match=r"question 1 is empty \(' '\)"):
    bm25.retrieve(['Where was Ilsa Marrow born?', ' '], top_k=3)

  # A dense index built with another tokenizer or encoder than the one embedding questions.
  passages = collection.passages[:20]
  tok_a = text.SubwordTokenizer.train(passages, 300)
  tok_b = text.SubwordTokenizer.train(passages[:10], 300)
  encoder = _tiny_bert(tok_a.vocab_size)
  index = retrieval.DenseIndex.build(encoder, tok_a, passages, max_len=16)
  dense = retrieval.DenseRetriever(encoder, tok_a, 16, index)
  ids, _ = dense.retrieve(passages[:3], top_k=2)
  np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])   # a passage is its own best match
  with pytest.raises(UserError, match='built with another tokenizer'):
    retrieval.DenseRetriever(encoder, tok_b, 16, index)
  with pytest.raises(UserError, match='built with another encoder'):
    retrieval.DenseRetriever(_tiny_bert(tok_a.vocab_size, seed=1), tok_a, 16, index)
  with pytest.raises(UserError, match='question 0 is empty'):
    dense.retrieve([''], top_k=1)


# --------------------------------------------------------------------- the bi-encoder run


def _tiny(total_steps):
  c = retriever_knowledge.get_config('tiny')
  c.update_from_flattened_dict({'total_steps': total_steps, 'checkpoint_every': 2,
                                'eval_every': 0, 'log_every': 1, 'model.num_layers': 1})
  return c


@pytest.fixture(scope='module')
def resumed_run(tmp_path_factory):
  """(uninterrupted 4-step result, workdir of a copy of it cut back to its step-2 checkpoint
  and resumed to 4, its result)."""
  root = tmp_path_factory.mktemp('retriever')
  full = loop.train(_tiny(4), str(root / 'full'))
  workdir = str(root / 'resumed')
  shutil.copytree(root / 'full', workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))   # as if stopped after step 2
  second = loop.train(_tiny(4), workdir)
  return full, workdir, second


def test_resume_is_exact(resumed_run):
  full, _, second = resumed_run
  assert_resumed_exactly(second, full)


def test_evaluate_reports_dense_and_bm25_recall(resumed_run, tmp_path):
  _, workdir, _ = resumed_run
  family, models, step = run_loader.load_models(workdir)
  summary = family.evaluate(models, workdir, step, {'split': 'val', 'batch': 64,
                                                    'report': None})
  assert 'dense: recall@1' in summary and 'bm25: recall@1' in summary
  with open(os.path.join(workdir, 'eval', f'retrieval_val_step{step}.json')) as f:
    report = json.load(f)
  assert report['questions'] == 8 * 5 * 3
  assert report['passages'] == 60 * 8   # five fact and three mention documents each
  # The dense recall against a brute-force search written here with numpy.
  questions = family.collection.questions_of('val')
  embed = lambda texts: retrieval.encode_tokens(models['model'], family.pad(texts), 64)
  scores = embed([q.text for q in questions]) @ embed(family.collection.passages).T
  best = np.argsort(-scores, axis=1, kind='stable')[:, :5]
  gold = np.array([q.gold_document for q in questions])[:, None]
  assert report['dense']['recall@5'] == pytest.approx((best == gold).any(1).mean())
  assert report['dense']['recall@1'] == pytest.approx((best[:, :1] == gold).any(1).mean())
  assert 0 < report['bm25']['recall@5'] <= 1
  # The index was saved; it is reused while it fits the run, refused once it does not.
  path = os.path.join(workdir, 'index', f'dense_step{step}.npz')
  assert os.path.isfile(path)
  other = retrieval.DenseIndex(np.zeros((480, 32), np.float32),
                               {'tokenizer': 'x', 'encoder': 'y'})
  other.save(path)
  with pytest.raises(UserError, match='built with another tokenizer'):
    family.evaluate(models, workdir, step, {'split': 'val', 'batch': 64, 'report': None})
  with pytest.raises(UserError, match='--split=dev'):
    family.evaluate(models, workdir, step, {'split': 'dev', 'batch': None, 'report': None})
