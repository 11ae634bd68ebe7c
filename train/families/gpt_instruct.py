"""Instruction fine-tuning of a GPT: prompt-response tasks with a response-only loss, and scores.

The network, sampling and tokenizer are the GPT family's (train/families/gpt.py); the data are
train/instruct.py's tasks. A run usually starts from a pretrained GPT (config.init_from, e.g.
experiments/configs/gpt_base.py's run) and inherits its tokenizer; any config.trainable and
config.lora apply (experiments/configs/gpt_instruct.py; experiments/compare_adaptation.py).

`train.evaluate` on such a run: each task's score on its test examples (greedy decoding until
[EOS]; sacreBLEU for translation, exact match for the synthetic tasks) and the language-model
loss on a held-out text (config.data.forgetting_source's validation split, e.g. Shakespeare) to
measure forgetting.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import gpt as gpt_lib
from train import instruct
from train import metrics as metrics_lib
from train import storage
from train.errors import UserError
from train.families import gpt as gpt_family


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean of `values` (a row with no weight adds nothing; all-zero weights give 0)."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class InstructGPTFamily(gpt_family.GPTFamily):
  """config.data: tasks (train/instruct.py's names), template ({instruction}, {input},
  {response} last), space_starts_response (the prompt's trailing spaces start the response,
  so that its first word is tokenized as in running text: train/instruct.py), max_len
  (tokens per training row: [EOS] prompt response [EOS], longer examples are dropped),
  held_out (validation and test examples per synthetic task), task_seed (the synthetic
  tasks' data), max_response_tokens (decoding budget when scoring), score_examples (test
  examples scored per task), forgetting_source (a GPT 'mix' source whose validation split
  measures forgetting, '' for none). The model is config.model as in the GPT family
  (block_size and widths must be the base run's when starting from it)."""

  name = 'gpt_instruct'

  def __init__(self, config):
    super().__init__(config)
    d = config.data
    self.tasks = instruct.check_tasks(d.tasks)
    self.template = instruct.check_template(str(d.template))
    # Absent from the config.json of runs written before the key existed: their default.
    self.space_starts_response = d.get('space_starts_response', False)
    if not isinstance(self.space_starts_response, bool):
      raise UserError(f'config.data.space_starts_response={self.space_starts_response!r}: '
                      'must be True or False')
    if self.tokenizer_kind == 'char':
      raise UserError("config.data.tokenizer='char': instruction rows need an [EOS] token; use "
                      "'subword' (with config.init_from: the base run's)")
    self.max_len = int(d.max_len)
    if not 8 <= self.max_len <= config.model.block_size - self.prompt_tokens:
      raise UserError(f'config.data.max_len={self.max_len}: must be in [8, block_size - '
                      f'prompt_tokens = {config.model.block_size - self.prompt_tokens}]')

  # ---- data ----
  def prompt_text(self, example: instruct.Example) -> str:
    """The prompt this run was trained on for `example` (config.data.space_starts_response
    decides where the space before the response goes)."""
    return instruct.render_prompt(self.template, example, self.space_starts_response)

  def _examples(self) -> dict[str, dict[str, list[instruct.Example]]]:
    d = self.config.data
    return instruct.load_examples(self.tasks, d.get('raw_dir'), int(d.get('task_seed', 0)),
                                  int(d.held_out))

  def _encode(self, examples: dict[str, list[instruct.Example]]) -> list[instruct.EncodedTask]:
    return [instruct.EncodedTask(examples[t], self.tokenizer, self.template, self._eos_id,
                                 self.max_len, self.space_starts_response) for t in self.tasks]

  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    splits = self._examples()
    # With config.init_from: the base's tokenizer; else one trained on the rendered examples.
    self.tokenizer = self._train_subword([instruct.render_prompt(self.template, e) + e.response
                                          for t in self.tasks for e in splits['train'][t]])
    train = self._encode(splits['train'])
    empty = [t for t, e in zip(self.tasks, train) if not len(e)]
    if empty:
      raise UserError(f'config.data.max_len={self.max_len}: every training example of '
                      f'{", ".join(empty)} is longer (tokens: [EOS] prompt response [EOS])')
    dropped = {t: e.dropped for t, e in zip(self.tasks, train) if e.dropped}
    if dropped:
      metrics_lib.print_line(f'instruction data: dropped training examples longer than '
                             f'config.data.max_len={self.max_len} tokens: {dropped}')
    self._train = instruct.InstructionBatches(
        train, max_len=self.max_len, global_batch_size=c.batch_size, seed=c.seed,
        process_index=process_index, process_count=process_count)
    self._eval = instruct.fixed_batches(self._encode(splits['validation']), self.max_len,
                                        c.batch_size, c.eval_batches, process_index,
                                        process_count)
    self._test = splits['test']

  # ---- loss ----
  def loss(self, models, batch, rng, *, train: bool):
    """Cross-entropy over the response tokens only (batch['weights'])."""
    logits = models['model'](batch['inputs'], dropout_key=rng if train else None)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return masked_mean(ce, batch['weights']), {}

  def row_tokens(self) -> int:
    return self.max_len

  # ---- scores ----
  def respond(self, model: gpt_lib.GPT, examples: list[instruct.Example], *,
              batch_size: int = 256, progress: str = '') -> list[str]:
    """Greedy responses (text up to the first [EOS]) to `examples`' prompts."""
    prompts = self.tokenizer.encode_batch(
        [self.prompt_text(e) for e in examples])
    prompts = [np.concatenate([[self._eos_id], p]).astype(np.int32) for p in prompts]
    budget = int(self.config.data.max_response_tokens)
    # A prompt that fills the context gets no response (an empty one, scored as such).
    fits = [len(p) < model.context_size for p in prompts]
    if not all(fits):
      metrics_lib.print_line(f'{progress or "responding"}: {fits.count(False)} of {len(fits)} '
                             f'prompts fill the {model.context_size} positions: no response')
    prompts = [p if ok else p[:1] for p, ok in zip(prompts, fits)]
    out = []
    progress_line = (metrics_lib.Progress(progress, len(prompts), unit='responses')
                     if progress else None)
    for k in range(0, len(prompts), batch_size):
      chunk = prompts[k:k + batch_size]
      longest = max(len(p) for p in chunk)
      # Widths rounded up to 16 (few shapes: few compiles) where the context allows.
      width = max(longest, min(-(-longest // 16) * 16, model.context_size - budget))
      new = min(budget, model.context_size - width)
      padded = np.zeros((len(chunk), width), np.int32)
      for i, p in enumerate(chunk):
        padded[i, :len(p)] = p
      tokens = np.asarray(gpt_lib.greedy_continue(
          model, padded, np.array([len(p) for p in chunk], np.int32), max_new_tokens=new))
      for row, ok in zip(tokens, fits[k:k + batch_size]):
        ends = np.flatnonzero(row == self._eos_id)
        out.append(self.tokenizer.decode(row[:ends[0]] if len(ends) else row).strip()
                   if ok else '')
      if progress_line:
        progress_line.update(len(chunk))
    return out

  def task_scores(self, model: gpt_lib.GPT) -> dict[str, dict[str, Any]]:
    """task -> its score on the test examples (and a few responses to read)."""
    if not hasattr(self, '_test'):
      self._test = self._examples()['test']   # the run's tokenizer stays (read_run_files)
    limit = int(self.config.data.score_examples)
    scores = {}
    for task in self.tasks:
      examples = self._test[task][:limit]
      hypotheses = self.respond(model, examples, progress=f'scoring {task}')
      scores[task] = {**instruct.score(task, hypotheses, [e.response for e in examples]),
                      'examples_shown': [{'input': e.input, 'reference': e.response,
                                          'response': h}
                                         for e, h in zip(examples[:3], hypotheses[:3])]}
    return scores

  def forgetting_loss(self, model: gpt_lib.GPT, window: int = 64) -> float | None:
    """Mean next-token loss on config.data.forgetting_source's validation documents, in
    consecutive windows of `window` tokens covering the split (None: no source)."""
    source = str(self.config.data.get('forgetting_source') or '')
    if not source:
      return None
    stream = self.stream(gpt_family.source_documents(source, self.config.data)['validation'])
    n = (len(stream) - 1) // window
    inputs = stream[:n * window].reshape(n, window)
    targets = stream[1:n * window + 1].reshape(n, window)
    graphdef, state = nnx.split(model)

    @jax.jit
    def total_loss(state, x, y):
      logits = nnx.merge(graphdef, state)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

    total = sum(float(total_loss(state, inputs[k:k + 64], targets[k:k + 64]))
                for k in range(0, n, 64))
    return total / (n * window)

  evaluate_flags = ('report',)

  def evaluate(self, models, workdir: str, step: int, options: dict[str, Any]) -> str:
    """Each task's test score and the forgetting loss; writes DIR/eval/tasks_step<S>.json (or
    --report)."""
    model = models['model']
    report = {'workdir': storage.absolute(workdir), 'family': self.name,
              'checkpoint_step': step, 'template': self.template,
              'tasks': self.task_scores(model)}
    loss = self.forgetting_loss(model)
    if loss is not None:
      report['forgetting'] = {'source': self.config.data.forgetting_source,
                              'split': 'validation', 'lm_loss': loss}
    path = options.get('report') or storage.join(workdir, 'eval', f'tasks_step{step}.json')
    storage.write_text(path, json.dumps(report, indent=1))
    lines = [f'{self.name} step {step}:'] + [
        f'  {t}: {s["metric"]} {s["score"]:.2f} ({s["examples"]} test examples)'
        for t, s in report['tasks'].items()]
    if loss is not None:
      lines.append(f'  {report["forgetting"]["source"]} validation LM loss {loss:.4f} '
                   f'(perplexity {math.exp(loss):.1f})')
    return '\n'.join(lines + [f'wrote {path}'])

  def write_samples(self, models, rng, path: str) -> None:
    """Greedy responses to the first two test examples of each task."""
    del rng
    if not hasattr(self, '_test'):
      return
    examples = [e for t in self.tasks for e in self._test[t][:2]]
    responses = self.respond(models['model'], examples)
    storage.write_text(path + '.txt', '\n\n'.join(
        f'[{e.task}] {e.input}\n  -> {r}\n  (reference: {e.response})'
        for e, r in zip(examples, responses)))
