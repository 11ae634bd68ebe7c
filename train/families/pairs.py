"""What the preference families share (reward model, DPO): the GPT family's model and
tokenizer, started from an instruction-tuned run, trained on train/preferences.py's pairs.

config.init_from must name the SFT run (a gpt_instruct run): its tokenizer is this run's, and
its params start the model(s). config.preferences.path names a pairs directory written from that
run (`python -m train.preferences`); its recorded tokenizer must be the SFT run's. Training
batches draw pairs of the train split (a pure function of (seed, step)); evaluation takes the
validation split's first config.eval_batches * batch_size pairs. A batch holds inputs, targets
and weights `[batch, 2, max_len]` (index 0 the chosen response, 1 the rejected; weights on the
response tokens and their [EOS]); config.data.max_len is the row length (the SFT run's works).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from train import metrics as metrics_lib
from train import preferences
from train import storage
from train import text as text_lib
from train import tune
from train.errors import UserError
from train.families import gpt as gpt_family


def response_log_probs(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Summed log-probability of each row's weighted targets.

  logits `[n, seq, vocab]`, targets `[n, seq]` int, weights `[n, seq]` -> `[n]` float32.
  """
  # -cross-entropy is the log-probability of the target token (optax: log_softmax picked).
  logp = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(logp * weights, axis=-1)


def flatten_pairs(batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """inputs, targets, weights `[batch, 2, L]` -> `[2 * batch, L]` each (rows 2i chosen, 2i + 1
  rejected), one forward pass for both responses."""
  return tuple(batch[k].reshape((-1,) + batch[k].shape[2:])
               for k in ('inputs', 'targets', 'weights'))


class PairsFamily(gpt_family.GPTFamily):
  """config.preferences.path: the pairs directory; config.preferences.min_confidence (default
  0.5: all): train on the pairs the judge was at least this sure of (preferences.confident);
  config.data.max_len: tokens per row."""

  def __init__(self, config):
    super().__init__(config)
    if self.tokenizer_kind != 'subword':
      raise UserError(f'config.data.tokenizer={self.tokenizer_kind!r}: the {self.name} family '
                      "reads its SFT run's subword tokenizer ('subword')")
    self.max_len = int(config.data.max_len)
    if not 8 <= self.max_len <= config.model.block_size:
      raise UserError(f'config.data.max_len={self.max_len}: must be in [8, '
                      f'config.model.block_size={config.model.block_size}]')
    if not str(config.preferences.get('path') or ''):
      raise UserError('config.preferences.path: empty; give the pairs directory written by '
                      '`python -m train.preferences --sft=SFT_RUN --out=DIR`')

  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    if not str(c.get('init_from') or ''):
      raise UserError(f'config.init_from: empty; the {self.name} family starts from the SFT '
                      'run (its tokenizer and params)')
    sft = tune.parse_init_from(str(c.init_from))[0]
    if not storage.isfile(storage.join(sft, text_lib.TOKENIZER_FILE)):
      raise UserError(f'config.init_from={c.init_from}: no {text_lib.TOKENIZER_FILE} there; '
                      'is it an instruction-tuned (gpt_instruct) run directory?')
    self.tokenizer = self._train_subword([])   # the init_from run's tokenizer.json
    path = str(c.preferences.path)
    manifest, splits = preferences.load(path)
    self.records = splits   # split -> records (the RLHF family takes its prompts from them)
    if manifest.get('tokenizer_sha256') != preferences.sha256(self.tokenizer.to_str()):
      raise UserError(f'config.preferences.path={path}: its pairs were tokenized by '
                      f'{manifest.get("sft")}, whose tokenizer differs from config.init_from='
                      f'{c.init_from}\'s')
    # The filter applies to the training pairs only: validation measures every pair.
    min_confidence = float(c.preferences.get('min_confidence', 0.5))
    train = preferences.confident(splits['train'], min_confidence)
    if min_confidence > 0.5:
      metrics_lib.print_line(f'train pairs: {len(train)} of {len(splits["train"])} judged with '
                             f'confidence >= config.preferences.min_confidence={min_confidence}')
    pairs = {'train': preferences.PairRows(train, self.max_len),
             'validation': preferences.PairRows(splits['validation'], self.max_len)}
    for split, rows in pairs.items():
      if rows.dropped:
        metrics_lib.print_line(f'{split} pairs: dropped {rows.dropped} of '
                               f'{len(rows) + rows.dropped} (identical responses, or longer '
                               f'than config.data.max_len={self.max_len})')
    if not len(pairs['train']):
      raise UserError(f'config.preferences.path={path}: no usable training pair (with '
                      f'config.preferences.min_confidence={min_confidence})')
    self._train = preferences.PairBatches(pairs['train'], global_batch_size=c.batch_size,
                                          seed=c.seed, process_index=process_index,
                                          process_count=process_count)
    self._eval = preferences.fixed_batches(pairs['validation'], c.batch_size, c.eval_batches,
                                           process_index, process_count)
    if not self._eval and c.eval_every:
      raise UserError(f'config.preferences.path={path}: fewer validation pairs than '
                      f'config.batch_size={c.batch_size}; set config.eval_every=0 or write more')

  def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    return metrics

  def row_tokens(self) -> int:
    return self.max_len

  def items_per_step(self) -> int:
    return 2 * self.config.batch_size * self.max_len   # both responses of every pair

  def flops_per_step(self, abstract_params) -> float | None:
    return None   # XLA's count (a frozen reference runs forward only)

  evaluate_flags: tuple[str, ...] = ()

  def evaluate(self, models, workdir: str, step: int, options: dict[str, Any]) -> str:
    raise UserError(f'family {self.name!r}: its metrics are the eval/ rows of metrics.jsonl '
                    '(pairwise accuracy on the validation pairs)')

  def write_samples(self, models, rng, path: str) -> None:
    del models, rng, path   # a preference model's text is its SFT run's
