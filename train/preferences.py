r"""Preference pairs with a hidden judge, for reward models, DPO and RLHF.

`python -m train.preferences --sft=RUN --out=PAIRS_DIR --num_prompts=N [--num_held_out=M]
[--seed=0] [--temperature=1.0] [--second_temperature=T] [--max_new_tokens=48]
[--judge_temperature=5.0] [--task=en_de]`

RUN is an instruction-tuned run (family gpt_instruct, e.g. experiments/configs/gpt_instruct.py)
that knows the translation task `--task`. For N prompts drawn (from the seed) out of Multi30k's
train split and M each out of its val and test2016 splits, the command samples two responses
from RUN's model (`models.gpt.sample_continue` at `--temperature`, up to `--max_new_tokens`
tokens or [EOS]; response j of prompt i draws from a key folded from (seed, split, i, j); with
`--second_temperature` the second response of each pair is drawn at that temperature instead,
so the pairs set a sharper sample against a more diffuse one, as Llama 2's preference data
varied the sampling temperature (Touvron et al. 2023, section 3.2.1)) and
lets the hidden judge pick one: with chrF_a and chrF_b the sentence chrF of the responses
against the reference translation (sacreBLEU's CHRF, default settings), it prefers a with
probability sigmoid((chrF_a - chrF_b) / judge_temperature) (Bradley-Terry noise; temperature 0
is a noiseless judge, ties a coin). Everything is a function of the flags: the same command
writes the same files.

The directory holds two files:
  preferences.jsonl  one JSON object per prompt: split ('train', 'validation', 'test'), index
                     (the example's index in its Multi30k split), input and reference (the
                     source and target sentences), prompt_ids ([EOS] then the rendered prompt's
                     token ids, RUN's tokenizer), responses (two texts), response_ids (two id
                     lists, each ending with [EOS] unless cut at --max_new_tokens), chrf (two
                     floats), p_first (the judge's probability of preferring the first) and
                     chosen (0 or 1: the response the judge preferred).
  preferences.json   the manifest: format, the SFT run (DIR:STEP), task, template, the flags,
                     counts per split, the sha256 of RUN's tokenizer (serialised) and of
                     preferences.jsonl. `load` checks the checksum and every record's fields,
                     so a damaged file is a one-line error.
The reward model and DPO (train/families/reward.py, dpo.py) train on the train split's pairs
and evaluate on the validation split's; the test prompts and references are held out for the
judge's verdict on a tuned model (win rate against the SFT model).
"""

from __future__ import annotations

import hashlib
import json
import math
import types
from typing import Any, Sequence

import jax
import numpy as np
from absl import flags

from train import instruct
from train import metrics
from train import run_loader
from train import storage
from train.errors import UserError

FORMAT = 'genlab-preferences/1'
RECORDS_FILE = 'preferences.jsonl'
MANIFEST_FILE = 'preferences.json'
SPLITS = ('train', 'validation', 'test')
_BATCH = 64   # prompts per sampling call (it changes no draw: keys are per response)

_FIELDS = {'split': str, 'index': int, 'input': str, 'reference': str, 'prompt_ids': list,
           'responses': list, 'response_ids': list, 'chrf': list, 'p_first': float,
           'chosen': int}


# ---------------------------------------------------------------------------------------------
# The hidden judge.
# ---------------------------------------------------------------------------------------------
def chrf(hypothesis: str, reference: str) -> float:
  """Sentence chrF (sacreBLEU's CHRF with its defaults: character 6-grams, beta 2), 0-100."""
  import sacrebleu  # pylint: disable=import-outside-toplevel
  return float(sacrebleu.sentence_chrf(hypothesis, [reference]).score)


def preference_probability(chrf_a: float, chrf_b: float, temperature: float) -> float:
  """P(a preferred over b) = sigmoid((chrF_a - chrF_b) / temperature); temperature 0 is a
  noiseless judge (1, 0, or 0.5 on a tie)."""
  if temperature < 0:
    raise UserError(f'--judge_temperature={temperature}: must be >= 0 (0: noiseless)')
  diff = chrf_a - chrf_b
  if temperature == 0:
    return 0.5 if diff == 0 else float(diff > 0)
  z = diff / temperature
  # Written so that neither branch overflows.
  return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def judge(responses: Sequence[tuple[str, str]], references: Sequence[str], temperature: float,
          rng: np.random.Generator) -> list[dict[str, Any]]:
  """The judge's verdict on each pair: chrf (two floats), p_first and chosen (0 or 1)."""
  out = []
  for (a, b), reference in zip(responses, references):
    scores = [chrf(a, reference), chrf(b, reference)]
    p = preference_probability(*scores, temperature)
    out.append({'chrf': scores, 'p_first': p, 'chosen': 0 if rng.random() < p else 1})
  return out


# ---------------------------------------------------------------------------------------------
# The file.
# ---------------------------------------------------------------------------------------------
def sha256(text: str) -> str:
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def write(out: str, records: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
  text = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
  counts = {s: sum(r['split'] == s for r in records) for s in SPLITS}
  storage.makedirs(out)
  storage.write_text(storage.join(out, RECORDS_FILE), text)
  storage.write_text(storage.join(out, MANIFEST_FILE), json.dumps(
      {'format': FORMAT, **manifest, 'counts': counts, 'records_sha256': sha256(text)},
      indent=1))


def _check_record(record: Any) -> str | None:
  """What is wrong with one record, or None."""
  if not isinstance(record, dict):
    return 'not a JSON object'
  for key, kind in _FIELDS.items():
    value = record.get(key)
    if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
      return f'field {key!r} missing or not a {kind.__name__}'
  if record['split'] not in SPLITS or record['chosen'] not in (0, 1):
    return 'split or chosen out of range'
  if not (len(record['responses']) == len(record['response_ids']) == len(record['chrf']) == 2):
    return 'responses, response_ids and chrf must hold two entries each'
  ids = [record['prompt_ids'], *record['response_ids']]
  if not all(isinstance(t, int) and t >= 0 for seq in ids for t in seq) or not ids[0]:
    return 'token ids must be non-negative ints (and the prompt non-empty)'
  return None


def load(path: str, culprit: str = 'config.preferences.path'
         ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
  """(manifest, split -> records) of the pairs directory `path`; UserError (one line, naming
  `culprit`) when a file is missing, fails its checksum or holds a malformed record."""
  where = f'{culprit}={path}'
  manifest_path, records_path = storage.join(path, MANIFEST_FILE), storage.join(path, RECORDS_FILE)
  for p in (manifest_path, records_path):
    if not storage.isfile(p):
      raise UserError(f'{where}: no {p} (write the pairs with `python -m train.preferences`)')
  try:
    manifest = json.loads(storage.read_text(manifest_path))
  except ValueError as e:
    raise UserError(f'{where}: {manifest_path} is damaged ({e})') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise UserError(f'{where}: {manifest_path} is not a {FORMAT} manifest')
  text = storage.read_text(records_path)
  if sha256(text) != manifest.get('records_sha256'):
    raise UserError(f'{where}: {records_path} is damaged (its sha256 differs from the one '
                    f'{MANIFEST_FILE} records); write the pairs again')
  splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
  for number, line in enumerate(text.splitlines(), 1):
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    problem = _check_record(record) if record is not None else 'not JSON'
    if problem:
      raise UserError(f'{where}: {records_path} line {number}: {problem}')
    splits[record['split']].append(record)
  return manifest, splits


def confidence(record: dict[str, Any]) -> float:
  """How sure the judge was of the pair: max(p_first, 1 - p_first), in [0.5, 1] (a function
  of the chrF gap alone, not of the verdict it then drew)."""
  return max(record['p_first'], 1.0 - record['p_first'])


def confident(records: list[dict[str, Any]], min_confidence: float,
              culprit: str = 'config.preferences.min_confidence') -> list[dict[str, Any]]:
  """The records whose judge's confidence is >= min_confidence (0.5 keeps every one).

  Like the degree of preference human raters give ("significantly better", ..., Touvron et al.
  2023, "Llama 2", section 3.2.1): a pair the judge could barely tell apart is close to a coin
  flip, so a reward model can be trained on the clear ones only."""
  if not 0.5 <= min_confidence < 1.0:
    raise UserError(f'{culprit}={min_confidence}: must be in [0.5, 1) (0.5 keeps every pair)')
  return [r for r in records if confidence(r) >= min_confidence]


# ---------------------------------------------------------------------------------------------
# Pairs as token rows.
# ---------------------------------------------------------------------------------------------
class PairRows:
  """One split's pairs as (chosen, rejected) token rows for a response-only loss.

  Pairs whose two responses are the same tokens (no preference to learn) and pairs whose
  longer row exceeds `max_len` tokens are dropped (`dropped` counts them).
  """

  def __init__(self, records: list[dict[str, Any]], max_len: int):
    self.max_len = max_len
    chosen = types.SimpleNamespace(prompts=[], responses=[])
    rejected = types.SimpleNamespace(prompts=[], responses=[])
    self.records = []
    for r in records:
      good, bad = r['response_ids'][r['chosen']], r['response_ids'][1 - r['chosen']]
      prompt = np.asarray(r['prompt_ids'], np.int32)
      if good == bad or len(prompt) + max(len(good), len(bad)) > max_len + 1:
        continue
      self.records.append(r)
      for side, response in ((chosen, good), (rejected, bad)):
        side.prompts.append(prompt)
        side.responses.append(np.asarray(response, np.int32))
    self._sides = (chosen, rejected)
    self.dropped = len(records) - len(self.records)

  def __len__(self) -> int:
    return len(self.records)

  def rows(self, picks: Sequence[int]) -> dict[str, np.ndarray]:
    """inputs, targets `[n, 2, max_len]` int32 and weights `[n, 2, max_len]` float32 (index 0
    of axis 1 the chosen response, 1 the rejected; weights 1 on the response's tokens and its
    [EOS], as train/instruct.py's rows)."""
    sides = [instruct.rows([side], [(0, i) for i in picks], self.max_len) for side in self._sides]
    return {k: np.stack([s[k] for s in sides], axis=1) for k in sides[0]}


class PairBatches:
  """Training batches of pairs: a pure function of (seed, step); each process its slice."""

  def __init__(self, pairs: PairRows, *, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count:
      raise UserError(f'config.batch_size={global_batch_size}: must be a multiple of the '
                      f'process count {process_count}')
    self.pairs, self.seed, self.global_batch_size = pairs, seed, global_batch_size
    local = global_batch_size // process_count
    self._slice = slice(process_index * local, (process_index + 1) * local)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, step])
    picks = rng.integers(0, len(self.pairs), self.global_batch_size)
    return self.pairs.rows([int(i) for i in picks[self._slice]])


def fixed_batches(pairs: PairRows, batch_size: int, num_batches: int, process_index: int = 0,
                  process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Evaluation batches: the split's first pairs in order (the same at every eval)."""
  count = min(len(pairs) // batch_size, num_batches)
  local = batch_size // process_count
  return [pairs.rows(range(k * batch_size + process_index * local,
                           k * batch_size + (process_index + 1) * local))
          for k in range(count)]


# ---------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------
def _sample_pairs(family, model, prompts: list[np.ndarray], keys: list[jax.Array],
                  max_new_tokens: int, temperature: float,
                  progress: metrics.Progress | None = None) -> list[list[int]]:
  """One sampled response per (prompt, key): ids up to and including the first [EOS]."""
  from models import gpt as gpt_lib  # pylint: disable=import-outside-toplevel
  out = []
  for k in range(0, len(prompts), _BATCH):
    chunk = prompts[k:k + _BATCH]
    longest = max(len(p) for p in chunk)
    # Widths rounded up to 16 (few shapes: few compiles) where the context allows.
    width = max(longest, min(-(-longest // 16) * 16, model.context_size - max_new_tokens))
    padded = np.zeros((len(chunk), width), np.int32)
    for i, p in enumerate(chunk):
      padded[i, :len(p)] = p
    tokens = np.asarray(gpt_lib.sample_continue(
        model, padded, np.array([len(p) for p in chunk], np.int32),
        jax.numpy.stack(keys[k:k + _BATCH]), max_new_tokens=max_new_tokens,
        temperature=temperature))
    for row in tokens:
      ends = np.flatnonzero(row == family._eos_id)  # pylint: disable=protected-access
      out.append([int(t) for t in (row[:ends[0] + 1] if len(ends) else row)])
    if progress is not None:
      progress.update(len(chunk))
  return out


def generate(sft: str, out: str, *, num_prompts: int, num_held_out: int, seed: int = 0,
             temperature: float = 1.0, max_new_tokens: int = 48, judge_temperature: float = 5.0,
             task: str = 'en_de', second_temperature: float | None = None) -> str:
  """Writes `out`'s preference files from run `sft`; returns a one-line summary."""
  if num_prompts < 1 or num_held_out < 0:
    raise UserError(f'--num_prompts={num_prompts} --num_held_out={num_held_out}: need >= 1 '
                    'training prompt and >= 0 held-out ones')
  if temperature <= 0:
    raise UserError(f'--temperature={temperature}: must be > 0 (two greedy responses are one)')
  if second_temperature is not None and second_temperature <= 0:
    raise UserError(f'--second_temperature={second_temperature}: must be > 0 (the second '
                    'response\'s sampling temperature)')
  if max_new_tokens < 1:
    raise UserError(f'--max_new_tokens={max_new_tokens}: must be >= 1')
  if task not in instruct.TRANSLATION:
    raise UserError(f'--task={task!r}: the judge needs a reference translation; use one of '
                    f'{", ".join(instruct.TRANSLATION)}')
  preference_probability(0.0, 0.0, judge_temperature)  # checks it
  if storage.exists(storage.join(out, RECORDS_FILE)):
    raise UserError(f'--out={out}: already holds {RECORDS_FILE}; give a new directory')
  family, models, step = run_loader.load_models(sft, use_ema=True)
  if family.name != 'gpt_instruct' or task not in family.tasks:
    raise UserError(f'--sft={sft}: a {family.name!r} run' + (
        f' trained on {", ".join(family.tasks)}' if family.name == 'gpt_instruct' else '')
        + f'; the pairs need a gpt_instruct run that knows --task={task}')
  model = models['model']
  if max_new_tokens >= model.context_size:
    raise UserError(f'--max_new_tokens={max_new_tokens}: must leave room for the prompt in '
                    f'the model\'s {model.context_size} positions')
  examples = instruct.load_examples((task,), family.config.data.get('raw_dir'), 0, 0)
  root = jax.random.key(seed)
  records = []
  counts = {split: min(num_prompts if split == 'train' else num_held_out,
                       len(examples[split][task])) for split in SPLITS}
  progress = metrics.Progress('sampling', 2 * sum(counts.values()), unit='responses',
                              note='two per prompt; prompts too long for the context are skipped')
  for split_index, split in enumerate(SPLITS):
    pool = examples[split][task]
    count = counts[split]
    picks = np.sort(np.random.default_rng([seed, split_index]).choice(
        len(pool), size=count, replace=False))
    chosen_examples, prompts = [], []
    for i in picks:
      ids = family.tokenizer.encode(family.prompt_text(pool[i]))
      prompt = np.concatenate([[family._eos_id], ids]).astype(np.int32)  # pylint: disable=protected-access
      if len(prompt) + max_new_tokens <= model.context_size:
        chosen_examples.append((int(i), pool[i]))
        prompts.append(prompt)
    if len(prompts) < count:
      progress.update(2 * (count - len(prompts)))   # the prompts skipped
    if not prompts:
      continue
    split_key = jax.random.fold_in(root, split_index)
    keys = [jax.random.fold_in(jax.random.fold_in(split_key, i), j)
            for i, _ in chosen_examples for j in (0, 1)]
    if second_temperature is None or second_temperature == temperature:
      ids = _sample_pairs(family, model, [p for p in prompts for _ in (0, 1)], keys,
                          max_new_tokens, temperature, progress)
    else:   # the first responses, then the second ones at their own temperature
      ids = [None] * len(keys)
      for j, t in ((0, temperature), (1, second_temperature)):
        ids[j::2] = _sample_pairs(family, model, prompts, keys[j::2], max_new_tokens, t,
                                  progress)
    texts = [family.tokenizer.decode([t for t in r if t != family._eos_id]).strip()  # pylint: disable=protected-access
             for r in ids]
    pairs = list(zip(texts[0::2], texts[1::2]))
    verdicts = judge(pairs, [e.response for _, e in chosen_examples], judge_temperature,
                     np.random.default_rng([seed, 7, split_index]))
    for n, ((index, example), prompt, verdict) in enumerate(
        zip(chosen_examples, prompts, verdicts)):
      records.append({'split': split, 'index': index, 'input': example.input,
                      'reference': example.response, 'prompt_ids': prompt.tolist(),
                      'responses': list(pairs[n]),
                      'response_ids': [ids[2 * n], ids[2 * n + 1]], **verdict})
  write(out, records, {
      'sft': f'{storage.absolute(sft)}:{step}', 'task': task, 'template': family.template,
      'space_starts_response': family.space_starts_response,
      'seed': seed, 'temperature': temperature,
      **({} if second_temperature is None else {'second_temperature': second_temperature}),
      'max_new_tokens': max_new_tokens,
      'judge_temperature': judge_temperature, 'tokenizer_sha256': sha256(family.tokenizer.to_str())})
  counts = {s: sum(r['split'] == s for r in records) for s in SPLITS}
  agree = np.mean([r['chrf'][r['chosen']] >= r['chrf'][1 - r['chosen']] for r in records])
  return (f'wrote {len(records)} pairs to {out} ({counts}); the judge chose the higher-chrF '
          f'response in {100 * agree:.1f}% of them')


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def define_flags() -> None:
  """The command's own flags (with train.sample's --out, --seed, --temperature and
  --max_new_tokens); defined only when it runs, so importing this module defines none."""
  from train import sample  # pylint: disable=import-outside-toplevel,unused-import
  flags.DEFINE_string('sft', None, 'The instruction-tuned run (gpt_instruct) to sample.')
  flags.DEFINE_integer('num_prompts', None, 'Training prompts (from Multi30k train).')
  flags.DEFINE_integer('num_held_out', 200, 'Prompts from each of Multi30k val and test2016.')
  flags.DEFINE_float('judge_temperature', 5.0,
                     'Bradley-Terry noise of the judge, in chrF points (0: none).')
  flags.DEFINE_string('task', 'en_de', 'The translation task: en_de or de_en.')
  flags.DEFINE_float('second_temperature', None, 'The second response of each pair is drawn at '
                     'this temperature (default: --temperature, as the first).')


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  for name in ('sft', 'out', 'num_prompts'):
    if f[name].value is None:
      raise UserError(f'--{name} is required')
  print(generate(f.sft, f.out, num_prompts=f.num_prompts, num_held_out=f.num_held_out,
                 seed=f.seed, temperature=1.0 if f.temperature is None else f.temperature,
                 max_new_tokens=48 if f.max_new_tokens is None else f.max_new_tokens,
                 judge_temperature=f.judge_temperature, task=f.task,
                 second_temperature=f.second_temperature), flush=True)


if __name__ == '__main__':
  from train import cli  # pylint: disable=import-outside-toplevel
  define_flags()
  cli.run(main)
