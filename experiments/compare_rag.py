r"""Retrieval-augmented generation against a closed-book generator on the knowledge task.

  python -m experiments.compare_rag --rag=RAG_RUN --closed_book=CLOSED_RUN \
      [--retriever_run=RET_RUN] [--split=test] [--top_k=K] [--out=rag.md]

RAG_RUN is a finished experiments/configs/rag_knowledge.py run, CLOSED_RUN one of its
`closed_book` ARG, RET_RUN a retriever_knowledge.py run (default: the one RAG_RUN names in
config.rag.retriever_run). Every question of the split (people no generator saw in training) is
answered greedily by:
  closed book            CLOSED_RUN, the question alone;
  RAG + BM25             RAG_RUN reading BM25's top K passages (K: --top_k, default the run's);
  RAG + dense            RAG_RUN reading the dense retriever's top K;
  RAG + oracle passage   RAG_RUN reading the gold passage first, then BM25's best K - 1 others;
and, as the chance level, the most frequent train answer of the question's attribute. Columns:
recall@1 and @5 of the passages read, answer exact match, token precision, recall and F1
(SQuAD's normalisation: train/rag.py), answers per second (retrieval, prompting and greedy
decoding of the whole split, after one warm-up batch; the dense index is built or read once
beforehand). Prints the Markdown table and writes it to --out, with a JSON beside it (the
figures and five answers per row).
"""

from __future__ import annotations

import collections
import json
import time

import numpy as np
from absl import flags

from train import cli
from train import metrics as metrics_lib
from train import rag
from train import retrieval
from train import run_loader
from train import storage
from train.errors import UserError

_RAG = flags.DEFINE_string('rag', None, 'A finished rag_knowledge.py run.')
_CLOSED = flags.DEFINE_string('closed_book', None, 'A finished rag_knowledge.py:closed_book run.')
_RETRIEVER = flags.DEFINE_string('retriever_run', None, 'A retriever_knowledge.py run (default: '
                                 'the one the RAG run names).')
_SPLIT = flags.DEFINE_enum('split', 'test', ['val', 'test'], 'Whose questions.')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Passages read (default: the RAG run\'s).')
_OUT = flags.DEFINE_string('out', None, 'Markdown file to write (and .json beside it).')


def chance_answers(collection, questions) -> list[str]:
  """The most frequent train answer of each question's attribute."""
  counts = collections.defaultdict(collections.Counter)
  for q in collection.questions_of('train'):
    counts[q.attribute][q.answer] += 1
  return [counts[q.attribute].most_common(1)[0][0] for q in questions]


def timed(family, model, questions, contexts_of) -> dict:
  """family.score of `questions` with contexts from `contexts_of(questions)`, answers/s over
  retrieval and answering (after a warm-up batch that compiles)."""
  family.answer(model, [q.text for q in questions[:256]], contexts_of(questions[:256]))
  start = time.perf_counter()
  contexts = contexts_of(questions)
  scores = family.score(model, questions, contexts)
  scores['answers_per_s'] = len(questions) / (time.perf_counter() - start)
  return scores


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _RAG.value or not _CLOSED.value:
    raise UserError('--rag and --closed_book are required (finished rag_knowledge.py runs)')
  family, models, step = run_loader.load_models(_RAG.value)
  closed, closed_models, closed_step = run_loader.load_models(_CLOSED.value)
  for f, flag in ((family, '--rag'), (closed, '--closed_book')):
    if f.name != 'rag_gpt':
      raise UserError(f'{flag}: a {f.name!r} run, not a rag_gpt run')
  if family.top_k == 0:
    raise UserError(f'--rag={_RAG.value}: a closed-book run (config.rag.top_k=0)')
  if closed.collection.args != family.collection.args:
    raise UserError(f'--closed_book: its knowledge task {closed.collection.args} is not the '
                    f'RAG run\'s {family.collection.args}')
  top_k = _TOP_K.value or family.top_k
  if top_k < 1:
    raise UserError(f'--top_k={top_k}: must be >= 1')
  collection = family.collection
  questions = collection.questions_of(_SPLIT.value)
  metrics_lib.print_line(f'{len(questions)} {_SPLIT.value} questions; RAG step {step}, '
                         f'closed book step {closed_step}, top {top_k}')
  bm25 = retrieval.BM25Retriever(collection.passages)
  start = time.perf_counter()
  dense = rag.load_dense(_RETRIEVER.value or family.config.rag.retriever_run, collection)
  metrics_lib.print_line(f'dense retriever and index ready in {time.perf_counter() - start:.1f} s')
  contexts = lambda name: (lambda qs: rag.retrieve_contexts(name, collection, qs, top_k,
                                                            dense, bm25))
  rows = {'closed book': timed(closed, closed_models['model'], questions,
                               lambda qs: np.zeros((len(qs), 0), np.int32))}
  for name in ('bm25', 'dense', 'oracle'):
    label = f'RAG + {name}' + (' passage' if name == 'oracle' else '')
    rows[label] = timed(family, models['model'], questions, contexts(name))
    metrics_lib.print_line(f'{label}: exact match {rows[label]["exact_match"]:.3f}')
  rows['chance (most frequent train answer of the attribute)'] = rag.answer_scores(
      chance_answers(collection, questions), [q.answer for q in questions])

  pct = lambda r, k: f'{100 * r[k]:.1f}' if k in r else '-'
  lines = [f'| generator ({len(questions)} {_SPLIT.value} questions, top {top_k}) | recall@1 | '
           'recall@5 | exact match | precision | recall | F1 | answers/s |',
           '|---|---|---|---|---|---|---|---|']
  for label, r in rows.items():
    speed = f'{r["answers_per_s"]:.0f}' if 'answers_per_s' in r else '-'
    lines.append(f'| {label} | ' + ' | '.join(pct(r, k) for k in (
        'recall@1', 'recall@5', 'exact_match', 'precision', 'recall', 'f1')) + f' | {speed} |')
  oracle = rows['RAG + oracle passage']['exact_match']
  for name in ('bm25', 'dense'):
    em = rows[f'RAG + {name}']['exact_match']
    lines.append(f'\nRAG + {name}: exact match {100 * em:.1f}% = '
                 f'{100 * em / max(oracle, 1e-9):.0f}% of the oracle passage\'s (goal >= 80%)')
  table = '\n'.join(lines)
  print(table, flush=True)
  if _OUT.value:
    storage.write_text(_OUT.value, table + '\n')
    storage.write_text(_OUT.value.rsplit('.', 1)[0] + '.json', json.dumps(
        {'rag': storage.absolute(_RAG.value), 'rag_step': step,
         'closed_book': storage.absolute(_CLOSED.value), 'closed_book_step': closed_step,
         'split': _SPLIT.value, 'top_k': top_k, 'rows': rows}, indent=1))


if __name__ == '__main__':
  cli.run(main)
