"""Retrieval-augmented generation on the knowledge task: prompts, retrieved contexts, scores.

A generator row (token ids of the run's subword tokenizer) is

  [EOS] passage_1 [SEP] passage_2 [SEP] ... passage_k [SEP] "Question: {q}\\nAnswer:" " {answer}" [EOS]

passages best first, as the retriever ranked them. `build_prompt` fits a prompt into the
model's positions less the tokens reserved for the answer: the question is never cut; when the
passages do not fit, each is cut from its end to a common length (the shortest ones kept whole,
the longer ones cut to the largest length that fits: "water-filling"), its [SEP] kept. A
closed-book prompt has no passages.

Scores (`answer_scores`): exact match and token-level precision, recall and F1 after SQuAD's
normalisation (lower case, punctuation and the articles a/an/the removed, whitespace
collapsed; Rajpurkar et al. 2016, the official v1.1 evaluation script), averaged over
questions.

Contexts: `retrieve_contexts` gives each question's passage ids `[n, k]` from 'bm25', 'dense'
(a retriever run, `load_dense`), or 'oracle' (the question's own gold document first, then the
best BM25 passages other than it).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

from train import knowledge
from train import retrieval
from train import text as text_lib
from train.errors import UserError

RETRIEVERS = ('bm25', 'dense', 'oracle', 'none')
QUESTION_TEMPLATE = 'Question: {question}\nAnswer:'


# ---------------------------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------------------------
def question_ids(tokenizer: text_lib.SubwordTokenizer, question: str) -> np.ndarray:
  return tokenizer.encode(QUESTION_TEMPLATE.format(question=question.strip()))


def answer_ids(tokenizer: text_lib.SubwordTokenizer, answer: str) -> np.ndarray:
  """The answer as it follows "Answer:" (byte-level tokens carry their leading space)."""
  return tokenizer.encode(' ' + answer.strip())


def fit_lengths(lengths: Sequence[int], budget: int) -> list[int]:
  """Water-filling: the largest cap c with sum(min(l, c)) <= budget; each length becomes
  min(l, c). Lengths count a passage's tokens and its [SEP]; a passage cut to its [SEP] alone
  (or less) is dropped (0)."""
  lengths = [int(l) for l in lengths]
  if sum(lengths) <= budget:
    return lengths
  cap = max(lengths)
  while cap > 0 and sum(min(l, cap) for l in lengths) > budget:
    cap -= 1
  return [min(l, cap) if cap >= 2 else 0 for l in lengths]


def build_prompt(passages: Sequence[np.ndarray], question: np.ndarray, context_size: int,
                 answer_tokens: int) -> np.ndarray:
  """`[EOS] passages... question` `[n]` int32 with n + answer_tokens <= context_size.

  passages: token ids of each passage (no [SEP]), best first; question: `question_ids`.
  UserError when the question alone does not fit (it is never cut).
  """
  budget = context_size - answer_tokens - 1 - len(question)  # [EOS] first
  if budget < 0:
    raise UserError(f'the question takes {len(question)} tokens: with [EOS] and the '
                    f'{answer_tokens} answer tokens it exceeds the model\'s {context_size} '
                    'positions; ask a shorter one')
  kept = fit_lengths([len(p) + 1 for p in passages], budget)
  parts = [np.array([text_lib.EOS_ID], np.int32)]
  for p, n in zip(passages, kept):
    if n:
      parts += [np.asarray(p[:n - 1], np.int32), np.array([text_lib.SEP_ID], np.int32)]
  parts.append(np.asarray(question, np.int32))
  return np.concatenate(parts)


def training_row(prompt: np.ndarray, answer: np.ndarray, max_len: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """inputs, targets `[max_len]` int32 and weights `[max_len]` float32 of the sequence
  prompt answer [EOS] (teacher forcing; weight 1 on the answer's tokens and its [EOS])."""
  seq = np.concatenate([prompt, answer, [text_lib.EOS_ID]]).astype(np.int32)
  if len(seq) > max_len + 1:
    raise ValueError(f'row of {len(seq)} tokens > max_len + 1 = {max_len + 1}')
  inputs = np.full(max_len, text_lib.PAD_ID, np.int32)
  targets = np.full(max_len, text_lib.PAD_ID, np.int32)
  weights = np.zeros(max_len, np.float32)
  inputs[:len(seq) - 1], targets[:len(seq) - 1] = seq[:-1], seq[1:]
  weights[len(prompt) - 1:len(seq) - 1] = 1.0
  return inputs, targets, weights


# ---------------------------------------------------------------------------------------------
# Scores (SQuAD v1.1's normalisation).
# ---------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
  s = ''.join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', s).split())


def token_scores(prediction: str, reference: str) -> dict[str, float]:
  """exact_match, precision, recall, f1 in [0, 1] of one answer (an empty normalised pair
  matches fully; one empty side scores 0)."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  exact = float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if not pred or not ref:
    return {'exact_match': exact, 'precision': exact, 'recall': exact, 'f1': exact}
  if common == 0:
    return {'exact_match': exact, 'precision': 0.0, 'recall': 0.0, 'f1': 0.0}
  precision, recall = common / len(pred), common / len(ref)
  return {'exact_match': exact, 'precision': precision, 'recall': recall,
          'f1': 2 * precision * recall / (precision + recall)}


def answer_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """The means of `token_scores` over the questions."""
  rows = [token_scores(p, r) for p, r in zip(predictions, references, strict=True)]
  return {k: float(np.mean([r[k] for r in rows])) if rows else 0.0
          for k in ('exact_match', 'precision', 'recall', 'f1')}


# ---------------------------------------------------------------------------------------------
# Retrieved contexts.
# ---------------------------------------------------------------------------------------------
def check_retriever(name: str, known: Sequence[str] = RETRIEVERS) -> str:
  if name not in known:
    raise UserError(f'--retriever={name!r}: unknown retriever (known: {", ".join(known)})')
  return name


def load_dense(run_dir: str, collection: knowledge.Collection) -> retrieval.DenseRetriever:
  """The dense retriever of retriever run `run_dir` (its latest checkpoint and its saved
  index, built there on first use); UserError when it is not a retriever run or was trained on
  another knowledge collection than `collection` (its document ids would mean other
  passages)."""
  if not run_dir:
    raise UserError('config.rag.retriever_run is empty: the dense retriever needs a `retriever` '
                    'run (experiments/configs/retriever_knowledge.py)')
  # Imported here: run_loader imports the loop, which imports the families (and so this module).
  from train import run_loader  # pylint: disable=import-outside-toplevel
  family, models, step = run_loader.load_run_of('retriever', run_dir, 'config.rag.retriever_run')
  if family.collection.args != collection.args:
    raise UserError(f'config.rag.retriever_run={run_dir}: indexes the knowledge task '
                    f'{family.collection.args}, but this run\'s is {collection.args}')
  index = family.dense_index(models['model'], run_dir, step)
  return family.retriever('dense', models['model'], index)


def retrieve_contexts(name: str, collection: knowledge.Collection,
                      questions: Sequence[knowledge.Question], top_k: int,
                      dense: retrieval.Retriever | None = None,
                      bm25: retrieval.Retriever | None = None) -> np.ndarray:
  """Passage ids `[n, top_k]` int32 (best first) of each question; 'none': `[n, 0]`."""
  check_retriever(name)
  texts = [q.text for q in questions]
  if name == 'none' or top_k == 0:
    return np.zeros((len(questions), 0), np.int32)
  if name == 'dense':
    if dense is None:
      raise UserError('--retriever=dense: no dense retriever (config.rag.retriever_run)')
    return dense.retrieve(texts, top_k)[0]
  bm25 = bm25 or retrieval.BM25Retriever(collection.passages)
  if name == 'bm25':
    return bm25.retrieve(texts, top_k)[0]
  # oracle: the gold document first, then BM25's best others.
  ids = bm25.retrieve(texts, min(top_k + 1, bm25.num_passages))[0]
  out = np.zeros((len(questions), top_k), np.int32)
  for i, q in enumerate(questions):
    others = [j for j in ids[i] if j != q.gold_document]
    out[i] = [q.gold_document] + others[:top_k - 1]
  return out
