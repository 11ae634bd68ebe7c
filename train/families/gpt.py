"""The GPT family: a decoder-only language model over a character or a subword tokenizer.

Data (config.data.name): a TFDS text dataset (tiny_shakespeare: one document, cut into random
windows as nanoGPT), 'multi30k' (one language's sentences, each followed by [EOS] with the
subword tokenizer or by a newline with the character one, then cut into windows the same way)
or 'mix' (config.data.sources' documents, each followed by [EOS]: see `mixed_documents`).
config.data.tokenizer: 'char' (nanoGPT's, vocabulary in family.json), 'subword' (byte-level
BPE of train/text.py, trained on the train split with config.data.vocab_size tokens, saved as
tokenizer.json in the run directory) or 'pretrained' (a pretrained model's own tokenizer.json,
config.data.tokenizer_file, whose config.data.eos_token ends each document; copied into the run
directory; `python -m train.import_hf` writes such runs).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import gpt as gpt_lib
from models import layers
from train import data as data_lib
from train import prune
from train import storage
from train import text as text_lib
from train import tune
from train.errors import UserError
from train.family import Family, dropout_bits

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def source_documents(source: str, data: Any) -> dict[str, list[str]]:
  """'train' and 'validation' documents of one source of a data mix.

  'multi30k:LANG': one document per sentence. 'multi30k:SRC-TGT' (e.g. en-de): one document per
  sentence pair, the SRC sentence, a newline, its TGT translation (parallel text, as a web
  crawl holds some). A TFDS text dataset name (tiny_shakespeare): its text cut at blank lines
  (for Shakespeare: one speech per document).
  """
  name, _, language = source.partition(':')
  if name == 'multi30k' and '-' in language:
    src, _, tgt = language.partition('-')
    pairs = {split: text_lib.load_multi30k_pairs(data.get('raw_dir'), raw, src, tgt)
             for split, raw in (('train', 'train'), ('validation', 'val'))}
    return {split: [f'{s}\n{t}' for s, t in zip(*pair)] for split, pair in pairs.items()}
  if name == 'multi30k':
    return {split: text_lib.load_multi30k(data.get('raw_dir'), raw, language or 'en')
            for split, raw in (('train', 'train'), ('validation', 'val'))}
  chars, splits = data_lib.load_text(name, data.get('data_dir'), data.get('raw_dir'))
  return {split: [p.strip('\n') + '\n' for p in chars.decode(splits[split]).split('\n\n')
                  if p.strip()]
          for split in ('train', 'validation')}


def mixed_documents(data: Any) -> dict[str, list[str]]:
  """config.data.sources (e.g. ('multi30k:en', 'multi30k:de', 'tiny_shakespeare')), concatenated."""
  sources = tuple(data.get('sources') or ())
  if not sources:
    raise UserError("config.data.sources: empty; config.data.name='mix' needs e.g. "
                    "('multi30k:en', 'multi30k:de', 'tiny_shakespeare')")
  docs: dict[str, list[str]] = {'train': [], 'validation': []}
  for source in sources:
    for split, d in source_documents(source, data).items():
      docs[split] += d
  return docs


class GPTFamily(Family):
  """config.model: block_size, num_layers, num_heads, embed_dim, dropout, init_std (None:
  1/sqrt(embed_dim); 0.02 is nanoGPT's), dtype ('float32' or 'bfloat16' activations; params
  stay float32), attention (None: by backend; 'einsum', 'xla', 'cudnn'), activation ('gelu'
  exact, the default; 'gelu_tanh' GPT-2's), vocab_size (pretrained tokenizer only: the
  model's, which may exceed the tokenizer's), prompt_tokens (prompt tuning: that many learned
  vectors before every sequence, which then holds block_size - prompt_tokens tokens; train them
  alone with config.trainable='prompt'). config.data: name, data_dir, raw_dir, tokenizer
  ('char', 'subword' or 'pretrained'), vocab_size (subword), tokenizer_file and eos_token
  (pretrained), language (multi30k), sources (mix). With config.init_from and the subword
  tokenizer, the run reads its base run's tokenizer.json instead of training one.
  config.eval_batches: how many validation batches each eval averages over."""

  name = 'gpt'
  unit = 'tokens'

  def __init__(self, config):
    super().__init__(config)
    self.tokenizer: data_lib.CharTokenizer | text_lib.SubwordTokenizer | None = None
    # Runs written before the subword tokenizer existed have no data.tokenizer: char.
    self.tokenizer_kind = config.data.get('tokenizer', 'char')
    if self.tokenizer_kind not in ('char', 'subword', 'pretrained'):
      raise UserError(f'config.data.tokenizer={self.tokenizer_kind!r}: use char, subword or '
                      'pretrained')
    m = config.model
    if m.get('activation', 'gelu') not in layers.ACTIVATIONS:
      raise UserError(f'config.model.activation={m.activation!r}: use one of '
                      f'{", ".join(layers.ACTIVATIONS)}')
    if m.dtype not in _DTYPES:
      raise UserError(f'config.model.dtype={m.dtype!r}: use one of {sorted(_DTYPES)}')
    if not isinstance(config.eval_batches, int) or config.eval_batches < 1:
      raise UserError(f'config.eval_batches={config.eval_batches!r}: must be >= 1 (validation '
                      'batches per eval; config.eval_every=0 evaluates only at the end)')
    self.prompt_tokens = int(m.get('prompt_tokens', 0) or 0)
    if not 0 <= self.prompt_tokens < m.block_size:
      raise UserError(f'config.model.prompt_tokens={self.prompt_tokens}: must be in [0, '
                      f'config.model.block_size={m.block_size})')
    if m.embed_dim % m.num_heads:
      raise UserError(f'config.model.embed_dim={m.embed_dim} is not divisible by '
                      f'config.model.num_heads={m.num_heads}')

  # ---- data ----
  def _token_streams(self) -> dict[str, np.ndarray]:
    """split -> [num_tokens] int32 ids; sets self.tokenizer."""
    c = self.config
    if c.data.name == 'mix':
      if self.tokenizer_kind == 'char':
        raise UserError("config.data.name='mix': needs config.data.tokenizer='subword' (each "
                        'document ends with [EOS])')
      docs = mixed_documents(c.data)
      self.tokenizer = self._train_subword(docs['train'])
      return {k: self.stream(d) for k, d in docs.items()}
    if c.data.name == 'multi30k':
      language = c.data.get('language', 'en')
      texts = {split: text_lib.load_multi30k(c.data.raw_dir, source, language)
               for split, source in (('train', 'train'), ('validation', 'val'))}
      if self.tokenizer_kind == 'char':
        self.tokenizer = data_lib.CharTokenizer.from_text(
            ''.join('\n'.join(t) + '\n' for t in texts.values()))
        return {k: self.tokenizer.encode('\n'.join(t) + '\n') for k, t in texts.items()}
      self.tokenizer = self._train_subword(texts['train'])
      return {k: self.stream(t) for k, t in texts.items()}
    chars, splits = data_lib.load_text(c.data.name, c.data.data_dir, c.data.raw_dir)
    if self.tokenizer_kind == 'char':
      self.tokenizer = chars
      return splits
    # One document per split: the subword tokenizer learns from the train text in lines.
    texts = {k: chars.decode(v) for k, v in splits.items()}
    self.tokenizer = self._train_subword(texts['train'].splitlines(keepends=True))
    return {k: self.tokenizer.encode(t) for k, t in texts.items()}

  def stream(self, documents: list[str]) -> np.ndarray:
    """[num_tokens] int32: each document's ids followed by the end-of-document token."""
    eos = np.array([self._eos_id], np.int32)
    return np.concatenate([x for ids in self.tokenizer.encode_batch(documents)
                           for x in (np.asarray(ids, np.int32), eos)])

  def _train_subword(self, texts: list[str]) -> text_lib.SubwordTokenizer:
    base = str(self.config.get('init_from') or '')
    if self.tokenizer_kind == 'subword' and base:
      # A fine-tuned run speaks its base's vocabulary: the base's ids are its embedding rows.
      return text_lib.load_from_workdir(tune.parse_init_from(base)[0])
    if self.tokenizer_kind == 'pretrained':
      tokenizer = text_lib.PretrainedTokenizer.load(self.config.data.tokenizer_file,
                                                    self.config.data.eos_token)
      if tokenizer.vocab_size > self._vocab_size():
        raise UserError(f'config.data.tokenizer_file={self.config.data.tokenizer_file}: '
                        f'{tokenizer.vocab_size} tokens > config.model.vocab_size='
                        f'{self._vocab_size()}')
      return tokenizer
    try:
      return text_lib.SubwordTokenizer.train(texts, self.config.data.vocab_size)
    except ValueError as e:
      raise UserError(f'config.data.vocab_size: {e}') from None

  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    splits = self._token_streams()
    windows = lambda tokens, seed: data_lib.TokenWindows(
        tokens, block_size=self.row_tokens(), global_batch_size=c.batch_size, seed=seed,
        process_index=process_index, process_count=process_count)
    self._train = windows(splits['train'], c.seed)
    # The same validation windows at every eval, so eval curves are comparable across steps.
    val = windows(splits['validation'], c.seed + 1)
    self._eval = [val.batch(i) for i in range(c.eval_batches)]

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._train.batch(step)

  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return self._eval

  @property
  def _eos_id(self) -> int:
    """The token that ends a sentence or document (subword and pretrained tokenizers)."""
    return (self.tokenizer.eos_id if self.tokenizer_kind == 'pretrained' else text_lib.EOS_ID)

  def _vocab_size(self) -> int:
    """The model's vocabulary: a pretrained model's may exceed its tokenizer's (padding)."""
    if self.tokenizer_kind == 'pretrained':
      return int(self.config.model.vocab_size)
    return self.tokenizer.vocab_size

  def metadata(self) -> dict[str, Any]:
    if self.tokenizer_kind != 'char':
      return {'tokenizer': self.tokenizer_kind, 'vocab_size': self.tokenizer.vocab_size}
    return {'chars': self.tokenizer.chars}

  def load_metadata(self, metadata: dict[str, Any]) -> None:
    if self.tokenizer_kind == 'char':
      self.tokenizer = data_lib.CharTokenizer(metadata['chars'])

  def write_run_files(self, workdir: str) -> None:
    if self.tokenizer_kind != 'char':
      text_lib.save_in_workdir(self.tokenizer, workdir)

  def read_run_files(self, workdir: str) -> None:
    if self.tokenizer_kind == 'subword':
      self.tokenizer = text_lib.load_from_workdir(workdir)
    elif self.tokenizer_kind == 'pretrained':
      self.tokenizer = text_lib.PretrainedTokenizer.load(
          storage.join(workdir, text_lib.TOKENIZER_FILE), self.config.data.eos_token)

  # ---- model and loss ----
  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    return {'model': self.build_gpt(self.config.model, rngs, prompt_tokens=self.prompt_tokens)}

  def build_gpt(self, m, rngs: nnx.Rngs, *, prompt_tokens: int = 0,
                cls: type[gpt_lib.GPT] = gpt_lib.GPT) -> gpt_lib.GPT:
    """A GPT (or a subclass `cls`, e.g. with a scalar head) of model config group `m` (e.g.
    config.model) over this run's vocabulary."""
    return cls(
        vocab_size=self._vocab_size(), block_size=m.block_size, num_layers=m.num_layers,
        num_heads=m.num_heads, embed_dim=m.embed_dim, dropout=m.dropout,
        dropout_bits=dropout_bits(m),
        init_std=m.get('init_std'), attention_implementation=m.get('attention'),
        activation=m.get('activation', 'gelu'), prompt_tokens=prompt_tokens,
        dtype=_DTYPES[m.dtype],
        param_dtype=jnp.float32, rngs=rngs)

  def loss(self, models, batch, rng, *, train: bool):
    logits = models['model'](batch['inputs'], dropout_key=rng if train else None)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()
    return loss, {}

  def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    loss = metrics['loss']
    bits = 'bits_per_char' if self.tokenizer_kind == 'char' else 'bits_per_token'
    return {**metrics, 'perplexity': math.exp(min(loss, 700.0)), bits: loss / math.log(2)}

  evaluate_flags = ('report',)

  def evaluate(self, models, workdir: str, step: int, options: dict[str, Any]) -> str:
    """Validation loss, perplexity and bits per token (char) on the config's dataset: the
    `config.eval_batches` windows that training evaluates on. Writes
    DIR/eval/perplexity_step<S>.json (or --report); returns a summary."""
    run_tokenizer = self.tokenizer
    self.setup_data(0, 1)  # the validation windows (the tokenizer is rebuilt from the data)
    as_text = lambda t: t.chars if self.tokenizer_kind == 'char' else t.to_str()
    if as_text(self.tokenizer) != as_text(run_tokenizer):
      raise UserError(f'--workdir={workdir}: the tokenizer built from config.data now differs '
                      'from the run\'s (changed data?): its validation ids would not be the '
                      'model\'s')
    graphdef, state = nnx.split(models['model'])
    loss_of = jax.jit(lambda state, batch: self.loss(
        {'model': nnx.merge(graphdef, state)}, batch, None, train=False)[0])
    losses = [float(loss_of(state, batch)) for batch in self._eval]
    metrics = self.derived_eval_metrics({'loss': float(np.mean(losses))})
    pruning = prune.Pruning(self.config)
    if pruning.enabled:  # a pruned run states what sparsity its weights reached
      metrics['sparsity'] = pruning.sparsity_reached(
          {'model': nnx.state(models['model'], nnx.Param)}, ['model'])['sparsity']
    c = self.config
    report = {'workdir': storage.absolute(workdir), 'family': self.name,
              'checkpoint_step': step, 'dataset': c.data.name, 'split': 'validation',
              'tokenizer': self.tokenizer_kind, 'windows': len(losses) * c.batch_size,
              'window_tokens': self.row_tokens(), **metrics}
    path = options.get('report') or storage.join(workdir, 'eval', f'perplexity_step{step}.json')
    storage.write_text(path, json.dumps(report, indent=1))
    return (f'{self.name} step {step} {c.data.name} validation ({report["windows"]} windows of '
            f'{self.row_tokens()} tokens): ' + ' | '.join(
                f'{k} {v:.4f}' for k, v in metrics.items()) + f'\nwrote {path}')

  # ---- reporting ----
  def row_tokens(self) -> int:
    """Tokens per batch row: the model's positions less its soft prompt's."""
    return self.config.model.block_size - self.prompt_tokens

  def items_per_step(self) -> int:
    return self.config.batch_size * self.row_tokens()

  def flops_per_step(self, abstract_params) -> float:
    """nanoGPT's estimate: 6N + 12*L*T*d training FLOPs per token, N = params less wpe."""
    m = self.config.model
    params = abstract_params['model']
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    n = size(params) - size(params['wpe'])
    span = self.prompt_tokens + self.row_tokens()  # the positions attention runs over
    return self.items_per_step() * gpt_lib.flops_per_token(n, m.num_layers, span, m.embed_dim)

  # ---- sampling ----
  def generate_text(self, model: gpt_lib.GPT, rng: jax.Array, *, prompt: str, num_samples: int,
                    max_new_tokens: int, temperature: float, top_k: int | None,
                    top_p: float | None) -> list[str]:
    if num_samples < 1:
      raise UserError(f'--num_samples={num_samples}: must be >= 1')
    if max_new_tokens < 1:
      raise UserError(f'--max_new_tokens={max_new_tokens}: must be >= 1')
    if temperature < 0:
      raise UserError(f'--temperature={temperature}: must be >= 0 (0 is greedy)')
    if top_k is not None and not 1 <= top_k <= self._vocab_size():
      raise UserError(f'--top_k={top_k}: must be in [1, {self._vocab_size()}]')
    if top_p is not None and not 0.0 < top_p <= 1.0:
      raise UserError(f'--top_p={top_p}: must be in (0, 1]')
    if self.tokenizer_kind == 'pretrained':
      # As GPT-2 was trained: a document starts after <|endoftext|> (the eos token).
      ids = np.concatenate([[self._eos_id], self.tokenizer.encode(prompt)]).astype(np.int32)
      decode = lambda row: self.tokenizer.decode(row, skip_special=False)
    elif self.tokenizer_kind == 'subword':
      # [EOS] ends a sentence in the Multi30k stream: a prompt continues from a boundary.
      ids = np.concatenate([[text_lib.EOS_ID], self.tokenizer.encode(prompt)]).astype(np.int32)
      decode = lambda row: self.tokenizer.decode(row, skip_special=False).replace('[EOS]', '\n')
    else:
      if not prompt:
        raise UserError('--prompt: must not be empty (the default is a newline)')
      ids, decode = self.tokenizer.encode(prompt), self.tokenizer.decode
    prompt_ids = jnp.tile(jnp.asarray(ids, jnp.int32)[None], (num_samples, 1))
    out = gpt_lib.generate(model, prompt_ids, rng, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p)
    return [prompt + decode(row) for row in np.asarray(out)]

  sample_flags = ('num_samples', 'prompt', 'max_new_tokens', 'temperature', 'top_k', 'top_p')

  def sample(self, models, rng, workdir, options) -> str:
    defaults = dict(num_samples=1, prompt='\n' if self.tokenizer_kind == 'char' else '',
                    max_new_tokens=500, temperature=1.0)
    options = {k: defaults.get(k) if v is None else v for k, v in options.items()}
    texts = self.generate_text(models['model'], rng, **{**defaults, **options})
    return '\n\n-----\n'.join(texts)

  def write_samples(self, models, rng, path: str) -> None:
    texts = self.generate_text(models['model'], rng,
                               prompt='\n' if self.tokenizer_kind == 'char' else '', num_samples=2,
                               max_new_tokens=int(self.config.get('sample_tokens', 256)),
                               temperature=1.0, top_k=None, top_p=None)
    storage.write_text(path + '.txt', '\n\n-----\n'.join(texts))
