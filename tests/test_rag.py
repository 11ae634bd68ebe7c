"""The RAG generator: prompts that keep the question, SQuAD-style scores on hand-computed cases,
and a tiny generator run (answer-only rows, exact resume, sampling with its one-line errors)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments.configs import rag_knowledge
from tests.test_sharding import assert_resumed_exactly
from train import loop
from train import rag
from train import run_loader
from train import text as text_lib
from train.errors import UserError

SEP, EOS = text_lib.SEP_ID, text_lib.EOS_ID


# ------------------------------------------------------------------------------------ prompts


def test_prompt_cuts_passages_from_their_end_and_never_the_question():
  passages = [np.arange(100, 110), np.arange(200, 203), np.arange(300, 307)]  # 10, 3, 7 tokens
  question = np.arange(50, 55)                                               # 5 tokens
  # Everything fits: [EOS] p1 [SEP] p2 [SEP] p3 [SEP] question, nothing cut.
  whole = rag.build_prompt(passages, question, context_size=40, answer_tokens=4)
  np.testing.assert_array_equal(whole, np.concatenate(
      [[EOS], passages[0], [SEP], passages[1], [SEP], passages[2], [SEP], question]))
  # 32 positions, 4 for the answer, [EOS] and the question: 22 left for 11 + 4 + 8 = 23
  # passage tokens (with their [SEP]s). Cutting every passage at 10 (with [SEP]) fits: the
  # first loses its last token, the others stay whole.
  cut = rag.build_prompt(passages, question, context_size=32, answer_tokens=4)
  np.testing.assert_array_equal(cut, np.concatenate(
      [[EOS], passages[0][:9], [SEP], passages[1], [SEP], passages[2], [SEP], question]))
  assert len(cut) + 4 == 32
  # 14 positions for passages: a cap of 5 each (5 + 4 + 5 = 14).
  tight = rag.build_prompt(passages, question, context_size=24, answer_tokens=4)
  np.testing.assert_array_equal(tight, np.concatenate(
      [[EOS], passages[0][:4], [SEP], passages[1], [SEP], passages[2][:4], [SEP], question]))
  # No room for any passage text: the question alone, whole.
  np.testing.assert_array_equal(
      rag.build_prompt(passages, question, context_size=12, answer_tokens=4),
      np.concatenate([[EOS], question]))
  with pytest.raises(UserError, match='the question takes 5 tokens') as e:
    rag.build_prompt(passages, question, context_size=9, answer_tokens=4)
  assert '\n' not in str(e.value)


def test_training_row_weights_the_answer_and_its_eos_only():
  prompt, answer = np.array([EOS, 11, 12, SEP, 13]), np.array([21, 22])
  inputs, targets, weights = rag.training_row(prompt, answer, max_len=10)
  np.testing.assert_array_equal(inputs, [EOS, 11, 12, SEP, 13, 21, 22, 0, 0, 0])
  np.testing.assert_array_equal(targets, [11, 12, SEP, 13, 21, 22, EOS, 0, 0, 0])
  np.testing.assert_array_equal(weights, [0, 0, 0, 0, 1, 1, 1, 0, 0, 0])


# ------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize('prediction, reference, want', [
    # (exact match, precision, recall, F1), computed by hand.
    ('The Tovenburg', 'tovenburg', (1, 1, 1, 1)),           # case and article
    ('Kavro Labs.', 'Kavro  Labs', (1, 1, 1, 1)),           # punctuation and spaces
    ('Kavro Mills', 'Kavro Labs', (0, 1 / 2, 1 / 2, 1 / 2)),
    ('a cello player', 'cello', (0, 1 / 2, 1, 2 / 3)),      # 'a' dropped: 'cello player'
    ('harp harp', 'harp', (0, 1 / 2, 1, 2 / 3)),            # repeated tokens count once
    ('', 'harp', (0, 0, 0, 0)),
    ('oboe', 'lute', (0, 0, 0, 0)),
])
def test_token_scores_on_hand_computed_cases(prediction, reference, want):
  got = rag.token_scores(prediction, reference)
  assert [got[k] for k in ('exact_match', 'precision', 'recall', 'f1')] == pytest.approx(want)


def test_answer_scores_are_means_over_questions():
  got = rag.answer_scores(['Kavro Mills', 'tovenburg', 'oboe'],
                          ['Kavro Labs', 'The Tovenburg', 'lute'])
  assert got == pytest.approx({'exact_match': 1 / 3, 'precision': 1.5 / 3, 'recall': 1.5 / 3,
                               'f1': 1.5 / 3})


# ------------------------------------------------------------------------ the generator run


def _tiny(total_steps):
  c = rag_knowledge.get_config('tiny')
  c.update_from_flattened_dict({'total_steps': total_steps, 'checkpoint_every': 2,
                                'eval_every': 0, 'log_every': 1, 'model.num_layers': 1})
  return c



@pytest.fixture(scope='module')
def resumed_run(tmp_path_factory):
  """(uninterrupted 4-step result, its workdir cut back to step 2 and resumed to 4, result)."""
  root = tmp_path_factory.mktemp('rag')
  one_device = jax.devices()[:1]   # (a mesh of the 8 fake devices would only cost compile time)
  full = loop.train(_tiny(4), str(root / 'full'), devices=one_device)
  workdir = str(root / 'resumed')
  shutil.copytree(root / 'full', workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))   # as if stopped after step 2
  second = loop.train(_tiny(4), workdir, devices=one_device)
  return full, workdir, second


@pytest.fixture(scope='module')
def loaded(resumed_run):
  """The resumed run's family, networks and step (`train.run_loader.load_models`)."""
  return run_loader.load_models(resumed_run[1])


def test_generator_trains_and_resumes_exactly(resumed_run, loaded):
  full, workdir, second = resumed_run
  assert all(np.isfinite(v) for v in full.step_losses.values())
  assert_resumed_exactly(second, full)
  # The training contexts were kept in the run: BM25's top 2, the gold passage not forced in.
  with open(os.path.join(workdir, 'retrieved.json')) as f:
    retrieved = json.load(f)
  family = loaded[0]
  train_q = family.collection.questions_of('train')
  ids = np.array(retrieved['train']['bm25'])
  assert ids.shape == (len(train_q), 2)
  has_gold = (ids == np.array([q.gold_document for q in train_q])[:, None]).any(1)
  assert 0 < has_gold.mean() < 1


def test_rows_ask_for_the_answer_after_the_question(loaded):
  family = loaded[0]
  questions = family.collection.questions_of('val')[:3]
  contexts = np.array([[q.gold_document, 0] for q in questions])
  rows = family.rows(questions, contexts)
  for i, q in enumerate(questions):
    w = rows['weights'][i].astype(bool)
    assert family.tokenizer.decode(rows['targets'][i][w], skip_special=False) == (
        f' {q.answer}[EOS]')
    n = int(np.argmax(w))   # the answer's first target: the input there ends the prompt
    prompt = family.tokenizer.decode(rows['inputs'][i][:n + 1], skip_special=False)
    assert prompt.startswith('[EOS]' + family.collection.passages[q.gold_document][:10])
    assert prompt.endswith(f'[SEP]Question: {q.text}\nAnswer:')


def test_sample_prints_answer_and_passages_and_refuses_bad_requests(resumed_run, loaded):
  workdir = resumed_run[1]
  family, models, _ = loaded
  key = jax.random.key(0)
  ask = lambda **o: family.sample(models, key, workdir,
                                  {'prompt': 'Where was Ilsa Marrow born?', **o})
  out = ask(retriever='bm25', top_k=3)
  lines = out.splitlines()
  assert lines[0] == 'question: Where was Ilsa Marrow born?' and lines[1].startswith('answer:')
  assert lines[2] == 'passages (bm25, top 3):' and len(lines) == 6
  for line in lines[3:]:
    doc = int(line.split(']')[0].split()[-1])
    assert line == f'  [doc {doc}] {family.collection.passages[doc]}'
  assert ask(retriever='none', top_k=None).endswith('passages: none (closed book)')
  for options, culprit in [({'retriever': 'tfidf'},
                            r"--retriever='tfidf': unknown retriever \(known: dense, bm25, none"),
                           ({'retriever': 'oracle'}, "--retriever='oracle': unknown"),
                           ({'top_k': 0}, '--top_k=0: must be >= 1'),
                           ({'prompt': '  '}, 'empty question'),
                           ({'retriever': 'dense'}, 'config.rag.retriever_run is empty')]:
    with pytest.raises(UserError, match=culprit) as e:
      family.sample(models, key, workdir, {'prompt': 'Who employs Ilsa Marrow?',
                                           'retriever': None, 'top_k': None, **options})
    assert '\n' not in str(e.value)
  # A dense retriever named by a run that is not a retriever run, or by no run at all.
  with pytest.raises(UserError, match="a 'rag_gpt' run, not a retriever run"):
    rag.load_dense(workdir, family.collection)
  with pytest.raises(UserError, match='config.rag.retriever_run=/nonexistent/ret: no such directory'):
    rag.load_dense('/nonexistent/ret', family.collection)
