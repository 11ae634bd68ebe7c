"""Instruction tasks for a GPT: prompt-response pairs, rendered with a template, each with a score.

Tasks (config.data.tasks):
  en_de, de_en   translate a Multi30k sentence (train split to train, val to evaluate the loss,
                 test2016 to score); scored by sacreBLEU's corpus BLEU.
  reverse, sort, count
                 synthetic: 3 to 7 words drawn (from a seed) from the 300 most frequent words of
                 Multi30k's English training sentences; respond with them in reverse order,
                 sorted alphabetically, or with how many there are. Scored by exact match.
                 Held-out examples never repeat a training input.

A template (config.data.template) holds {instruction}, {input} and {response}, which must end it:
the text before {response} is the prompt. A training row is [EOS] prompt response [EOS] (the
subword stream's document boundary first, as in pretraining); the loss covers the response and
its [EOS] only (`weights`), so the model is never trained to produce the prompt.

Prompt and response are tokenized apart, so the boundary between them is a token boundary. With
a byte-level BPE tokenizer (GPT-2's kind) a word carries the space before it ('Ġdogs'), so a
prompt ending in a space ('Response: ') ends in a lone space token, and the response's first
word is spelt in other, rarer tokens ('dogs' at the start of a text, often split into pieces)
than the same word in the input: to copy it the model must learn a spelling, not a copy.
config.data.space_starts_response=True moves the spaces that end the rendered prompt to the
start of the response, so the first word is the token it is inside running text (the problem
"token healing" mends at sampling time, here avoided in the data). Off by default: the runs
recorded before it existed reproduce, and translation, whose first word starts a line without a
space in the pretraining documents, scored lower with it (experiments/README.md, "The space
before the response", where the adapters learn to reverse word lists only with it).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from typing import Any, Sequence

import numpy as np

from train import text as text_lib
from train.errors import UserError

INSTRUCTIONS = {
    'en_de': 'Translate English to German.',
    'de_en': 'Translate German to English.',
    'reverse': 'Reverse the order of the words.',
    'sort': 'Sort the words alphabetically.',
    'count': 'Count the words.',
}
TRANSLATION = {'en_de': ('en', 'de'), 'de_en': ('de', 'en')}
DEFAULT_TEMPLATE = 'Instruction: {instruction}\nInput: {input}\nResponse: {response}'
SYNTHETIC_TRAIN = 20000   # training examples per synthetic task
VOCAB_WORDS = 300


@dataclasses.dataclass(frozen=True)
class Example:
  task: str
  input: str
  response: str


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
  tasks = tuple(tasks)
  unknown = [t for t in tasks if t not in INSTRUCTIONS]
  if not tasks or unknown:
    raise UserError(f'config.data.tasks={tasks}: '
                    + (f'unknown {unknown}; ' if unknown else 'empty; ')
                    + f'known: {", ".join(INSTRUCTIONS)}')
  return tasks


def check_template(template: str) -> str:
  """The template, or a UserError naming what is wrong with it."""
  fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  missing = [f for f in ('instruction', 'input', 'response') if f not in fields]
  if missing:
    raise UserError(f'config.data.template={template!r}: lacks the slot(s) '
                    + ', '.join('{' + f + '}' for f in missing))
  if set(fields) - {'instruction', 'input', 'response'} or fields.count('response') != 1:
    raise UserError(f'config.data.template={template!r}: only {{instruction}}, {{input}} and '
                    'one {response} may appear')
  if not template.endswith('{response}'):
    raise UserError(f'config.data.template={template!r}: must end with {{response}} (the '
                    'text before it is the prompt)')
  return template


def render_prompt(template: str, example: Example, space_starts_response: bool = False
                  ) -> str:
  """The prompt text: the template up to {response}, filled; without its trailing spaces
  where `space_starts_response` (they start the response instead: `render_response`)."""
  prompt = template[:-len('{response}')].format(instruction=INSTRUCTIONS[example.task],
                                                input=example.input)
  return prompt.rstrip(' ') if space_starts_response else prompt


def render_response(template: str, example: Example, space_starts_response: bool = False
                    ) -> str:
  """The response text: the example's, after the prompt's trailing spaces where
  `space_starts_response`. render_prompt + render_response is the filled template either way."""
  if not space_starts_response:
    return example.response
  prompt = render_prompt(template, example)
  return ' ' * (len(prompt) - len(prompt.rstrip(' '))) + example.response


# ---------------------------------------------------------------------------------------------
# The tasks' examples.
# ---------------------------------------------------------------------------------------------
def _word_list(raw_dir: str | None) -> list[str]:
  """The most frequent lowercase words of Multi30k's English training sentences."""
  counts = collections.Counter(
      w for line in text_lib.load_multi30k(raw_dir, 'train', 'en')
      for w in re.findall(r'[a-z]+', line.lower()) if len(w) > 1)
  return sorted(w for w, _ in counts.most_common(VOCAB_WORDS))


def _synthetic_response(task: str, words: list[str]) -> str:
  if task == 'reverse':
    return ' '.join(reversed(words))
  if task == 'sort':
    return ' '.join(sorted(words))
  return str(len(words))  # count


def _synthetic(task: str, words: list[str], count: int, seed: int,
               exclude: frozenset[str] = frozenset()) -> list[Example]:
  rng = np.random.default_rng([seed, list(INSTRUCTIONS).index(task)])
  out, seen = [], set(exclude)
  while len(out) < count:
    picked = [words[i] for i in rng.choice(len(words), size=int(rng.integers(3, 8)),
                                           replace=False)]
    text = ' '.join(picked)
    if text in seen:
      continue
    seen.add(text)
    out.append(Example(task, text, _synthetic_response(task, picked)))
  return out


def load_examples(tasks: Sequence[str], raw_dir: str | None, seed: int,
                  held_out: int) -> dict[str, dict[str, list[Example]]]:
  """split ('train', 'validation', 'test') -> task -> examples.

  Translation: Multi30k train, val, test2016. Synthetic: SYNTHETIC_TRAIN training examples and
  `held_out` validation and test examples each, drawn from `seed` (0 is the default data).
  """
  splits: dict[str, dict[str, list[Example]]] = {'train': {}, 'validation': {}, 'test': {}}
  words = None
  for task in check_tasks(tasks):
    if task in TRANSLATION:
      source, target = TRANSLATION[task]
      for split, raw in (('train', 'train'), ('validation', 'val'), ('test', 'test2016')):
        src, tgt = text_lib.load_multi30k_pairs(raw_dir, raw, source, target)
        splits[split][task] = [Example(task, s.strip(), t.strip()) for s, t in zip(src, tgt)]
      continue
    words = words or _word_list(raw_dir)
    train = _synthetic(task, words, SYNTHETIC_TRAIN, seed)
    seen = frozenset(e.input for e in train)
    held = _synthetic(task, words, 2 * held_out, seed + 1, exclude=seen)
    splits['train'][task] = train
    splits['validation'][task], splits['test'][task] = held[:held_out], held[held_out:]
  return splits


# ---------------------------------------------------------------------------------------------
# Token rows with a response-only loss.
# ---------------------------------------------------------------------------------------------
class EncodedTask:
  """One task's examples as token ids: [EOS] prompt, and response [EOS]."""

  def __init__(self, examples: list[Example], tokenizer, template: str, eos_id: int,
               max_len: int, space_starts_response: bool = False):
    prompts = tokenizer.encode_batch([render_prompt(template, e, space_starts_response)
                                      for e in examples])
    responses = tokenizer.encode_batch([render_response(template, e, space_starts_response)
                                        for e in examples])
    self.examples, self.prompts, self.responses = [], [], []
    for example, p, r in zip(examples, prompts, responses):
      # Rows hold max_len + 1 tokens (inputs and targets are shifted views of them).
      if 1 + len(p) + len(r) + 1 <= max_len + 1:
        self.examples.append(example)
        self.prompts.append(np.concatenate([[eos_id], p]).astype(np.int32))
        self.responses.append(np.concatenate([r, [eos_id]]).astype(np.int32))
    self.dropped = len(examples) - len(self.examples)

  def __len__(self) -> int:
    return len(self.examples)


def rows(tasks: Sequence[EncodedTask], picks: Sequence[tuple[int, int]], max_len: int
         ) -> dict[str, np.ndarray]:
  """inputs, targets `[n, max_len]` int32 and weights `[n, max_len]` float32 (1 on the
  response tokens and the final [EOS], 0 on the prompt and the padding) for (task, example)
  `picks`."""
  n = len(picks)
  inputs = np.full((n, max_len), text_lib.PAD_ID, np.int32)
  targets = np.full((n, max_len), text_lib.PAD_ID, np.int32)
  weights = np.zeros((n, max_len), np.float32)
  for row, (t, i) in enumerate(picks):
    prompt, response = tasks[t].prompts[i], tasks[t].responses[i]
    seq = np.concatenate([prompt, response])
    inputs[row, :len(seq) - 1] = seq[:-1]
    targets[row, :len(seq) - 1] = seq[1:]
    weights[row, len(prompt) - 1:len(seq) - 1] = 1.0
  return {'inputs': inputs, 'targets': targets, 'weights': weights}


class InstructionBatches:
  """Training batches: each row picks a task uniformly (an equal multi-task mix), then one of
  its examples; a pure function of (seed, step); each process takes its slice of the rows."""

  def __init__(self, tasks: list[EncodedTask], *, max_len: int, global_batch_size: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count:
      raise UserError(f'config.batch_size={global_batch_size}: must be a multiple of the '
                      f'process count {process_count}')
    self.tasks, self.max_len, self.seed = tasks, max_len, seed
    self.global_batch_size = global_batch_size
    local = global_batch_size // process_count
    self._slice = slice(process_index * local, (process_index + 1) * local)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, step])
    which = rng.integers(0, len(self.tasks), self.global_batch_size)
    picks = [(int(t), int(rng.integers(0, len(self.tasks[t])))) for t in which]
    return rows(self.tasks, picks[self._slice], self.max_len)


def fixed_batches(tasks: list[EncodedTask], max_len: int, batch_size: int, num_batches: int,
                  process_index: int = 0, process_count: int = 1
                  ) -> list[dict[str, np.ndarray]]:
  """Evaluation batches: the tasks' first examples in turn (the same at every eval); each
  process gets its slice of every global batch."""
  picks = [(t, i) for i in range(max(len(t) for t in tasks))
           for t in range(len(tasks)) if i < len(tasks[t])]
  picks = picks[:batch_size * num_batches]
  local = batch_size // process_count
  return [rows(tasks, picks[k + process_index * local:k + (process_index + 1) * local], max_len)
          for k in range(0, len(picks) - batch_size + 1, batch_size)]


# ---------------------------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------------------------
def score(task: str, hypotheses: list[str], references: list[str]) -> dict[str, Any]:
  """BLEU (translation) or exact match in % (synthetic), with what it was computed on."""
  if task in TRANSLATION:
    import sacrebleu  # pylint: disable=import-outside-toplevel
    metric = sacrebleu.metrics.BLEU()
    bleu = metric.corpus_score(hypotheses, [references])
    return {'metric': 'bleu', 'score': round(bleu.score, 2),
            'signature': str(metric.get_signature()), 'examples': len(hypotheses)}
  hits = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references))
  return {'metric': 'exact_match', 'score': round(100.0 * hits / max(len(references), 1), 2),
          'examples': len(hypotheses)}
