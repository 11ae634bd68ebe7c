"""The RAG generator family: a GPT that answers knowledge-task questions from retrieved passages.

The network, tokenizer handling and sampling machinery are the GPT family's (subword tokenizer:
[SEP] separates passages, [EOS] ends the answer); the data are train/knowledge.py's questions
about the train people, each rendered as train/rag.py's row ("passages + question", answer),
the loss on the answer tokens and its [EOS] only.

Training contexts (config.rag.train_retriever): each train question's top-k passages
(config.rag.top_k) from BM25 ('bm25'), from the dense retriever of config.rag.retriever_run
('dense'), or from either, drawn per row from (seed, step) ('mix', the default). The gold passage
is not forced in: a row whose retriever missed it still asks for the answer, and the others'
passages are distractors (BM25's: the person's other facts and people who share a name word;
dense: the same fact of people with similar names), so the model has to read which passage
answers. The contexts are computed once at each start (deterministic) and kept in the run
directory (retrieved.json); a resumed run checks it gets the same ones. config.rag.top_k=0 is
the closed-book generator: the question alone.

`python -m train.sample --workdir=DIR --prompt="Where was Ilsa Marrow born?"
[--retriever=dense|bm25|none] [--top_k=K]` prints the greedy answer and the passages it read.
Here --top_k is the number of passages (the family decodes greedily: no top-k sampling to
confuse it with); the defaults are the run's (config.rag).
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Sequence

import numpy as np
import optax

from models import gpt as gpt_lib
from train import knowledge
from train import rag
from train import retrieval
from train import storage
from train import text as text_lib
from train.errors import UserError
from train.families import gpt as gpt_family
from train.families.gpt_instruct import masked_mean

RETRIEVED_FILE = 'retrieved.json'
TRAIN_RETRIEVERS = {'bm25': ('bm25',), 'dense': ('dense',), 'mix': ('bm25', 'dense')}


class RAGGPTFamily(gpt_family.GPTFamily):
  """config.rag: top_k (passages per prompt; 0: closed book), train_retriever ('bm25',
  'dense', 'mix'), retriever_run (a retriever run directory: the dense retriever),
  answer_tokens (positions reserved for the answer and its [EOS]; the decoding budget).
  config.data: task_seed, num_entities, val_entities, test_entities, mentions
  (train/knowledge.py),
  vocab_size (the tokenizer, trained on the train people's documents and questions).
  config.model as the GPT family's; block_size bounds prompt + answer."""

  name = 'rag_gpt'
  unit = 'tokens'

  def __init__(self, config):
    super().__init__(config)
    if self.tokenizer_kind != 'subword':
      raise UserError(f'config.data.tokenizer={self.tokenizer_kind!r}: the RAG generator needs '
                      "'subword' ([SEP] between passages, [EOS] after the answer)")
    r = config.rag
    if not isinstance(r.top_k, int) or r.top_k < 0:
      raise UserError(f'config.rag.top_k={r.top_k!r}: must be >= 0 (0: closed book)')
    if r.train_retriever not in TRAIN_RETRIEVERS:
      raise UserError(f'config.rag.train_retriever={r.train_retriever!r}: use one of '
                      f'{", ".join(TRAIN_RETRIEVERS)}')
    if not 2 <= r.answer_tokens < self.row_tokens() // 2:
      raise UserError(f'config.rag.answer_tokens={r.answer_tokens}: must be in [2, '
                      f'block_size / 2 = {self.row_tokens() // 2})')
    d = config.data
    knowledge.check_sizes(d.num_entities, d.val_entities, d.test_entities)
    self.top_k = int(r.top_k)
    self.collection: knowledge.Collection | None = None

  @property
  def train_retrievers(self) -> tuple[str, ...]:
    return ('none',) if self.top_k == 0 else TRAIN_RETRIEVERS[self.config.rag.train_retriever]

  # ---- data ----
  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    if c.batch_size % process_count:
      raise UserError(f'config.batch_size={c.batch_size} must be a multiple of the process '
                      f'count {process_count}')
    self.collection = knowledge.from_config(c.data)
    train_q = self.collection.questions_of('train')
    # The generator's vocabulary never saw the val or test people (with init_from: the base's).
    self.tokenizer = self._train_subword(
        [d.text for d in self.collection.documents
         if self.collection.entities[d.entity].split == 'train'] + [q.text for q in train_q])
    dense = (rag.load_dense(c.rag.retriever_run, self.collection)
             if 'dense' in self.train_retrievers else None)
    bm25 = retrieval.BM25Retriever(self.collection.passages)
    val_q = self.collection.questions_of('val')
    # Val questions in a seeded order, read with the first training retriever.
    order = np.random.default_rng(c.seed + 1).permutation(len(val_q))
    val_q = [val_q[i] for i in order[:c.batch_size * c.eval_batches]]
    self.retrieved = {'train': {name: rag.retrieve_contexts(name, self.collection, train_q,
                                                            self.top_k, dense, bm25).tolist()
                                for name in self.train_retrievers},
                      'val': rag.retrieve_contexts(self.train_retrievers[0], self.collection,
                                                   val_q, self.top_k, dense, bm25).tolist(),
                      'val_questions': [q.id for q in val_q]}
    # [retriever, question, ...] rows of every train question under each training retriever.
    rows = [self.rows(train_q, np.array(self.retrieved['train'][n], np.int32).reshape(
        len(train_q), self.top_k)) for n in self.train_retrievers]
    self._train_rows = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    val_rows = self.rows(val_q, np.array(self.retrieved['val'], np.int32).reshape(
        len(val_q), self.top_k))
    local = c.batch_size // process_count
    self._rows = slice(process_index * local, (process_index + 1) * local)
    self._eval = [{k: v[lo:lo + c.batch_size][self._rows] for k, v in val_rows.items()}
                  for lo in range(0, len(val_q) - c.batch_size + 1, c.batch_size)]
    if not self._eval:
      raise UserError(f'config.batch_size={c.batch_size} exceeds the {len(val_q)} val questions '
                      '(evaluation uses whole batches): lower it')

  def prompts(self, questions: Sequence[str], contexts: np.ndarray) -> list[np.ndarray]:
    """Token ids of each question's prompt; contexts `[n, k]` passage ids, best first."""
    passages = {int(i): None for i in np.asarray(contexts).reshape(-1)}
    encoded = self.tokenizer.encode_batch([self.collection.passages[i] for i in passages])
    passages = dict(zip(passages, encoded))
    return [rag.build_prompt([passages[int(i)] for i in ids], rag.question_ids(self.tokenizer, q),
                             self.row_tokens(), self.config.rag.answer_tokens)
            for q, ids in zip(questions, contexts, strict=True)]

  def rows(self, questions: Sequence[knowledge.Question], contexts: np.ndarray
           ) -> dict[str, np.ndarray]:
    """inputs, targets `[n, block_size]` int32, weights `[n, block_size]` float32."""
    try:
      prompts = self.prompts([q.text for q in questions], contexts)
    except UserError as e:  # a question of the task does not fit: the config's fault
      raise UserError(f'config.model.block_size={self.config.model.block_size}: {e}') from None
    budget = self.config.rag.answer_tokens
    out = {'inputs': [], 'targets': [], 'weights': []}
    for q, prompt in zip(questions, prompts):
      answer = rag.answer_ids(self.tokenizer, q.answer)
      if len(answer) + 1 > budget:
        raise UserError(f'config.rag.answer_tokens={budget}: the answer {q.answer!r} takes '
                        f'{len(answer)} tokens and [EOS] 1 more: raise it')
      for k, v in zip(out, rag.training_row(prompt, answer, self.row_tokens())):
        out[k].append(v)
    return {k: np.stack(v) for k, v in out.items()}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    retrievers, n = self._train_rows['inputs'].shape[:2]
    rng = np.random.default_rng([self.config.seed, step])
    which = rng.integers(n, size=self.config.batch_size)[self._rows]
    by = rng.integers(retrievers, size=self.config.batch_size)[self._rows]
    return {k: v[by, which] for k, v in self._train_rows.items()}

  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return self._eval

  def write_run_files(self, workdir: str) -> None:
    super().write_run_files(workdir)
    for name, now in ((knowledge.RUN_FILE, self.collection.to_json()),
                      (RETRIEVED_FILE, json.dumps(self.retrieved))):
      knowledge.write_run_file(storage.join(workdir, name), now)

  def read_run_files(self, workdir: str) -> None:
    super().read_run_files(workdir)
    self.collection = knowledge.read_collection(workdir)

  # ---- loss ----
  def loss(self, models, batch, rng, *, train: bool):
    """Cross-entropy over the answer tokens and their [EOS] (batch['weights'])."""
    logits = models['model'](batch['inputs'], dropout_key=rng if train else None)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return masked_mean(ce, batch['weights']), {}

  def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    return metrics

  # ---- answers ----
  def answer(self, model: gpt_lib.GPT, questions: Sequence[str], contexts: np.ndarray,
             batch_size: int = 256) -> list[str]:
    """Greedy answers (the text up to the first [EOS]) to `questions` reading `contexts`
    (`[n, k]` passage ids, best first; k = 0: closed book)."""
    prompts = self.prompts(questions, contexts)
    budget = self.config.rag.answer_tokens
    out = []
    for lo in range(0, len(prompts), batch_size):
      chunk = prompts[lo:lo + batch_size]
      rows = batch_size if len(prompts) > batch_size else len(chunk)  # one shape per width
      longest = max(len(p) for p in chunk)
      # Widths rounded up to 16 (few shapes: few compiles); prompts leave `budget` positions.
      width = max(longest, min(-(-longest // 16) * 16, model.context_size - budget))
      padded = np.zeros((rows, width), np.int32)
      lengths = np.ones(rows, np.int32)
      for i, p in enumerate(chunk):
        padded[i, :len(p)], lengths[i] = p, len(p)
      tokens = np.asarray(gpt_lib.greedy_continue(model, padded, lengths,
                                                  max_new_tokens=budget))
      for row in tokens[:len(chunk)]:
        ends = np.flatnonzero(row == text_lib.EOS_ID)
        out.append(self.tokenizer.decode(row[:ends[0]] if len(ends) else row).strip())
    return out

  def score(self, model: gpt_lib.GPT, questions: Sequence[knowledge.Question],
            contexts: np.ndarray) -> dict[str, Any]:
    """Answer scores (train/rag.py) of `questions` reading `contexts`, recall@1/5 of the
    contexts, answers per second (prompting and decoding; retrieval not included)."""
    start = time.perf_counter()
    answers = self.answer(model, [q.text for q in questions], contexts)
    seconds = time.perf_counter() - start
    gold = np.array([q.gold_document for q in questions])
    recall = (retrieval.recall_at(contexts, gold, [k for k in (1, 5) if k <= contexts.shape[1]])
              if contexts.shape[1] else {})
    return {**rag.answer_scores(answers, [q.answer for q in questions]), **recall,
            'answers_per_s': len(questions) / seconds, 'questions': len(questions),
            'examples': [{'question': q.text, 'answer': q.answer, 'predicted': a}
                         for q, a in zip(questions[:5], answers[:5])]}

  # ---- sampling ----
  sample_flags = ('prompt', 'retriever', 'top_k')

  def retriever_for(self, name: str, top_k: int) -> tuple[str, int]:
    """(retriever, top_k) of a sampling request, checked; None values take the run's own."""
    default = 'none' if self.top_k == 0 else ('dense' if self.config.rag.retriever_run
                                              else 'bm25')
    # (The oracle passage exists only for the task's own questions: experiments/compare_rag.py.)
    name = rag.check_retriever(default if name is None else name, ('dense', 'bm25', 'none'))
    if name == 'none':
      return name, 0
    if self.top_k == 0:
      raise UserError(f'--retriever={name}: this is a closed-book run (config.rag.top_k=0), '
                      'trained without passages; use --retriever=none')
    top_k = self.top_k if top_k is None else top_k
    if top_k < 1:
      raise UserError(f'--top_k={top_k}: must be >= 1 (passages to read)')
    return name, top_k

  def sample(self, models, rng, workdir, options) -> str:
    del rng, workdir  # greedy
    question = options.get('prompt')
    if question is None or not question.strip():
      raise UserError(f'--prompt={question!r}: empty question; ask e.g. --prompt="Where was '
                      'Ilsa Marrow born?"')
    name, top_k = self.retriever_for(options.get('retriever'), options.get('top_k'))
    contexts = np.zeros((1, 0), np.int32)
    if name != 'none':
      retriever = (rag.load_dense(self.config.rag.retriever_run, self.collection)
                   if name == 'dense' else retrieval.BM25Retriever(self.collection.passages))
      contexts = retriever.retrieve([question], top_k)[0]
    answer = self.answer(models['model'], [question], contexts)[0]
    lines = [f'question: {question.strip()}', f'answer: {answer}',
             f'passages ({name}, top {top_k}):' if top_k else 'passages: none (closed book)']
    lines += [f'  [doc {i}] {self.collection.passages[i]}' for i in contexts[0]]
    return '\n'.join(lines)

  def write_samples(self, models, rng, path: str) -> None:
    del models, rng, path  # `python -m train.sample` and experiments/compare_rag.py read it

  evaluate_flags = ('split', 'retriever', 'report')

  def evaluate(self, models, workdir: str, step: int, options: dict[str, Any]) -> str:
    """Answer scores of a split's questions (default val) read with --retriever's top
    config.rag.top_k passages (default the run's); writes DIR/eval/answers_<split>_<retriever>
    _step<S>.json (or --report). experiments/compare_rag.py compares every retriever."""
    split = options.get('split') or 'val'
    if split not in ('val', 'test'):
      raise UserError(f'--split={split}: use val or test (the people no generator trained on)')
    name = rag.check_retriever(options.get('retriever') or self.retriever_for(None, None)[0],
                               ('dense', 'bm25', 'oracle', 'none'))
    if (name == 'none') != (self.top_k == 0):
      raise UserError(f'--retriever={name}: this run reads '
                      + ('no passages' if self.top_k == 0 else f'{self.top_k} passages'))
    questions = self.collection.questions_of(split)
    dense = (rag.load_dense(self.config.rag.retriever_run, self.collection)
             if name == 'dense' else None)
    contexts = rag.retrieve_contexts(name, self.collection, questions, self.top_k, dense)
    report = {'workdir': storage.absolute(workdir), 'family': self.name,
              'checkpoint_step': step, 'split': split, 'retriever': name, 'top_k': self.top_k,
              **self.score(models['model'], questions, contexts)}
    path = options.get('report') or storage.join(
        workdir, 'eval', f'answers_{split}_{name}_step{step}.json')
    storage.write_text(path, json.dumps(report, indent=1))
    return (f'{self.name} step {step}, {split} ({len(questions)} questions, {name}, top '
            f'{self.top_k}): ' + ' | '.join(f'{k} {report[k]:.3f}' for k in (
                'exact_match', 'precision', 'recall', 'f1') + tuple(
                    k for k in ('recall@1', 'recall@5') if k in report)) + f'\nwrote {path}')
