"""The translation family: a transformer encoder-decoder on Multi30k (models/seq2seq.py).

Data: Multi30k task 1 pairs read from the raw files (train/text.py), a joint byte-level BPE
vocabulary trained on the training split's source and target sentences (kept in the run
directory as tokenizer.json), packed batches of pairs (`train.text.PackedPairs`).
Loss: label-smoothed cross-entropy of teacher-forced next-token predictions over the target
tokens. Decoding: greedy or beam search (models/decoding.py) with the decoder's KV cache.
Evaluation (`python -m train.evaluate`): sacreBLEU BLEU and chrF of the detokenised output
against the raw references.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from models import decoding
from models import seq2seq
from train import storage
from train import text
from train.errors import UserError
from train.family import Family, dropout_bits

DEFAULT_PROMPT = 'A man in an orange hat is smiling.'


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float
                           ) -> tuple[jax.Array, jax.Array]:
  """Per-token (label-smoothed loss, plain negative log-likelihood).

  The smoothed target puts 1 - smoothing on the label and smoothing / vocab on every token
  (optax.smooth_labels), so the loss is (1 - s) * nll + s * mean over the vocabulary of
  -log p, computed without materialising one-hot targets.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return (1.0 - smoothing) * nll - smoothing * logp.mean(-1), nll


class TranslateFamily(Family):
  """config.data: raw_dir, source, target ('en'/'de'), vocab_size (joint BPE), max_train_pairs.
  config.model: num_encoder_layers, num_decoder_layers, num_heads, embed_dim, mlp_dim, dropout,
  max_len (row length of packed batches and the longest source/target accepted).
  config.label_smoothing; config.decode: beam_size, length_penalty (defaults of sample/evaluate).
  config.batch_size counts packed rows of max_len tokens per side."""

  name = 'translate'
  unit = 'tokens'
  sample_flags = ('prompt', 'beam_size', 'length_penalty')
  evaluate_flags = ('split', 'beam_size', 'length_penalty', 'batch', 'report', 'num_samples')

  def __init__(self, config):
    super().__init__(config)
    d, m = config.data, config.model
    if {d.source, d.target} != set(text.MULTI30K_LANGUAGES):
      raise UserError(f'config.data.source={d.source!r}, target={d.target!r}: use en and de '
                      '(either way round)')
    if m.embed_dim % m.num_heads:
      raise UserError(f'config.model.embed_dim={m.embed_dim} is not divisible by '
                      f'config.model.num_heads={m.num_heads}')
    if not 0.0 <= config.label_smoothing < 1.0:
      raise UserError(f'config.label_smoothing={config.label_smoothing}: must be in [0, 1)')
    self.tokenizer: text.SubwordTokenizer | None = None
    self._translate_fns: dict[Any, Any] = {}

  # ---- data ----
  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    src, tgt = text.load_multi30k_pairs(c.data.raw_dir, 'train', c.data.source, c.data.target)
    if c.data.max_train_pairs > 0:
      src, tgt = src[:c.data.max_train_pairs], tgt[:c.data.max_train_pairs]
    self.tokenizer = text.SubwordTokenizer.train(src + tgt, c.data.vocab_size)
    packed = lambda split_src, split_tgt, **kw: text.PackedPairs(
        self.tokenizer.encode_batch(split_src), self.tokenizer.encode_batch(split_tgt),
        src_len=c.model.max_len, tgt_len=c.model.max_len, batch_rows=c.batch_size,
        process_index=process_index, process_count=process_count, **kw)
    self._train = packed(src, tgt, seed=c.seed)
    val_src, val_tgt = text.load_multi30k_pairs(c.data.raw_dir, 'val', c.data.source,
                                                c.data.target)
    self._eval = packed(val_src, val_tgt, seed=0, shuffle=False).all_batches()
    self._sample_pairs = (val_src[:8], val_tgt[:8])
    self._tokens_per_batch = self._train.real_tokens(0)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._train.batch(step)

  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return self._eval

  def metadata(self) -> dict[str, Any]:
    return {'source': self.config.data.source, 'target': self.config.data.target,
            'vocab_size': self.tokenizer.vocab_size}

  def write_run_files(self, workdir: str) -> None:
    text.save_in_workdir(self.tokenizer, workdir)

  def read_run_files(self, workdir: str) -> None:
    self.tokenizer = text.load_from_workdir(workdir)

  # ---- model and loss ----
  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    m = self.config.model
    return {'model': seq2seq.Seq2Seq(
        vocab_size=self.tokenizer.vocab_size, num_encoder_layers=m.num_encoder_layers,
        num_decoder_layers=m.num_decoder_layers, num_heads=m.num_heads, embed_dim=m.embed_dim,
        mlp_dim=m.mlp_dim, dropout=m.dropout, max_len=m.max_len,
        dropout_bits=dropout_bits(m), rngs=rngs)}

  def loss(self, models, batch, rng, *, train: bool):
    logits = models['model'](batch, dropout_key=rng if train else None)
    loss, nll = smoothed_cross_entropy(logits, batch['tgt_out'], self.config.label_smoothing)
    mask = (batch['tgt_seg'] > 0).astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, -1) == batch['tgt_out']) * mask
    return (loss * mask).sum() / count, {'nll': (nll * mask).sum() / count,
                                         'accuracy': correct.sum() / count}

  def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    return {**metrics, 'perplexity': math.exp(min(metrics['nll'], 700.0))}

  def items_per_step(self) -> int:
    """Real (non-padding) source + target tokens of a batch, averaged over epoch 0."""
    return int(round(self._tokens_per_batch))

  # ---- decoding ----
  def _translate_fn(self, model: seq2seq.Seq2Seq, beam_size: int, length_penalty: float):
    """A jitted [batch, S] source ids -> ([batch, max_len] output ids, [batch] scores)."""
    key = (id(model), beam_size, float(length_penalty))
    if key not in self._translate_fns:
      graphdef, state = nnx.split(model)
      tok = self.tokenizer
      max_len = model.max_len
      common = dict(max_len=max_len, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                    banned_ids=(tok.pad_id, tok.bos_id, tok.unk_id, tok.mask_id, tok.sep_id))

      @jax.jit
      def translate(state, src):
        m = nnx.merge(graphdef, state)
        batch = src.shape[0]
        valid = src != tok.pad_id
        if beam_size > 1:
          valid = jnp.repeat(valid, beam_size, axis=0)
          src = jnp.repeat(src, beam_size, axis=0)
        start = m.init_decode(src, valid, max_len)  # encoder and cross K/V: once
        step = lambda tokens, index, cache: m.decode_step(
            tokens, index, cache, start['cross'], start['cross_mask'])
        if beam_size == 1:
          return decoding.greedy_search(step, start['cache'], batch_size=batch, **common)
        tokens, scores = decoding.beam_search(step, start['cache'], batch_size=batch,
                                              beam_size=beam_size,
                                              length_penalty=length_penalty, **common)
        return tokens[:, 0], scores[:, 0]

      self._translate_fns[key] = functools.partial(translate, state)
    return self._translate_fns[key]

  def encode_sources(self, sentences: Sequence[str], max_len: int, *, strict: bool
                     ) -> tuple[list[np.ndarray], int]:
    """Source ids + EOS per sentence, and how many were cut to `max_len` tokens. With
    `strict`, a sentence that does not fit is a UserError instead."""
    out, cut = [], 0
    for s, ids in zip(sentences, self.tokenizer.encode_batch(sentences)):
      if len(ids) + 1 > max_len:
        if strict:
          raise UserError(f'--prompt: {len(ids)} tokens (+ EOS) exceed the model\'s max_len '
                          f'{max_len}; shorten it (sentences are translated whole, never cut)')
        ids, cut = ids[:max_len - 1], cut + 1
      out.append(np.append(ids, self.tokenizer.eos_id).astype(np.int32))
    return out, cut

  def translate(self, model: seq2seq.Seq2Seq, sentences: Sequence[str], *, beam_size: int,
                length_penalty: float, batch: int = 64, strict: bool = False
                ) -> tuple[list[str], dict[str, Any]]:
    """Translations of `sentences` and decoding facts (sentences cut to fit, seconds).

    Sentences are sorted by length and decoded `batch` at a time, sources padded to a multiple
    of 16 tokens and the last batch to `batch` rows, so few shapes are compiled.
    """
    if beam_size < 1:
      raise UserError(f'--beam_size={beam_size}: must be >= 1')
    if length_penalty < 0:
      raise UserError(f'--length_penalty={length_penalty}: must be >= 0')
    if batch < 1:
      raise UserError(f'--batch={batch}: must be >= 1')
    fn = self._translate_fn(model, beam_size, length_penalty)
    sources, cut = self.encode_sources(sentences, model.max_len, strict=strict)
    order = np.argsort([len(s) for s in sources], kind='stable')
    outputs: list[str] = [''] * len(sources)
    widths_seen, times = set(), []  # (sentences, seconds, compiled a new shape)
    for lo in range(0, len(order), batch):
      t0 = time.perf_counter()
      idx = order[lo:lo + batch]
      width = min(model.max_len, -(-max(len(sources[i]) for i in idx) // 16) * 16)
      src = np.full((batch, width), self.tokenizer.pad_id, np.int32)
      src[:, 0] = self.tokenizer.eos_id  # filler rows: empty sentences
      for r, i in enumerate(idx):
        src[r, :len(sources[i])] = sources[i]
      tokens, _ = jax.device_get(fn(jnp.asarray(src)))
      for r, i in enumerate(idx):
        row = tokens[r]
        end = np.flatnonzero(row == self.tokenizer.eos_id)
        outputs[i] = self.tokenizer.decode(row[:end[0]] if len(end) else row)
      times.append((len(idx), time.perf_counter() - t0, width not in widths_seen))
      widths_seen.add(width)
    steady = [(n, t) for n, t, new in times if not new]
    return outputs, {
        'truncated_sources': cut, 'seconds': sum(t for _, t, _ in times),
        'batches_compiling': len(times) - len(steady),
        # Batches whose shape was already compiled: the decoding speed itself.
        'sentences_per_s': (sum(n for n, _ in steady) / sum(t for _, t in steady)
                            if steady else None)}

  # ---- sampling and evaluation ----
  def _decode_options(self, options: dict[str, Any]) -> tuple[int, float]:
    d = self.config.decode
    beam = d.beam_size if options.get('beam_size') is None else options['beam_size']
    alpha = d.length_penalty if options.get('length_penalty') is None else options[
        'length_penalty']
    return int(beam), float(alpha)

  def sample(self, models, rng, workdir, options) -> str:
    del rng, workdir  # decoding is deterministic
    beam, alpha = self._decode_options(options)
    prompt = DEFAULT_PROMPT if options.get('prompt') is None else options['prompt']
    if not prompt.strip():
      raise UserError('--prompt: must not be empty')
    out, _ = self.translate(models['model'], [prompt], beam_size=beam, length_penalty=alpha,
                            batch=1, strict=True)
    return out[0]

  def write_samples(self, models, rng, path: str) -> None:
    del rng
    src, ref = self._sample_pairs
    beam, alpha = self._decode_options({})
    hyp, _ = self.translate(models['model'], src, beam_size=beam, length_penalty=alpha,
                            batch=len(src))
    storage.write_text(path + '.txt', ''.join(
        f'SRC {s}\nREF {r}\nOUT {h}\n\n' for s, r, h in zip(src, ref, hyp)))

  def evaluate(self, models, workdir: str, step: int, options: dict[str, Any]) -> str:
    """sacreBLEU BLEU and chrF on a Multi30k split (`--split`, default test2016; its first
    `--num_samples` sentences when given): writes
    DIR/eval/bleu_<split>_beam<K>_lp<alpha>_step<S>.json (or --report) and the translations
    beside it (.txt); returns a summary."""
    import sacrebleu  # pylint: disable=import-outside-toplevel
    split = options.get('split') or 'test2016'
    if split not in text.MULTI30K_SPLITS:
      raise UserError(f'--split={split}: unknown Multi30k split (known: '
                      f'{", ".join(text.MULTI30K_SPLITS)})')
    beam, alpha = self._decode_options(options)
    c = self.config
    src, ref = text.load_multi30k_pairs(c.data.raw_dir, split, c.data.source, c.data.target)
    if options.get('num_samples') is not None:
      if options['num_samples'] < 1:
        raise UserError(f'--num_samples={options["num_samples"]}: must be >= 1')
      src, ref = src[:options['num_samples']], ref[:options['num_samples']]
    t0 = time.perf_counter()
    hyp, facts = self.translate(models['model'], src, beam_size=beam, length_penalty=alpha,
                                batch=options.get('batch') or 64)
    wall = time.perf_counter() - t0
    if facts['truncated_sources']:
      logging.warning('%d of %d sources longer than max_len %d were cut', 
                      facts['truncated_sources'], len(src), models['model'].max_len)
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hyp, [ref]), chrf.corpus_score(hyp, [ref])
    report = {
        'workdir': storage.absolute(workdir), 'family': self.name, 'checkpoint_step': step,
        'num_params': seq2seq.num_params(models['model']), 'split': split,
        'direction': f'{c.data.source}-{c.data.target}', 'num_sentences': len(src),
        'beam_size': beam, 'length_penalty': alpha if beam > 1 else None,
        'bleu': bleu_score.score, 'chrf': chrf_score.score, 'bleu_text': str(bleu_score),
        'bleu_signature': str(bleu.get_signature()),
        'chrf_signature': str(chrf.get_signature()),
        'sentences_per_s': len(src) / wall, 'decode_seconds': wall,
        'steady_sentences_per_s': facts['sentences_per_s'],
        'batches_compiling': facts['batches_compiling'],
        'truncated_sources': facts['truncated_sources'],
        'examples': [{'source': s, 'reference': r, 'output': h}
                     for s, r, h in list(zip(src, ref, hyp))[:5]]}
    name = f'bleu_{split}_beam{beam}' + (f'_lp{alpha:g}' if beam > 1 else '') + f'_step{step}'
    path = options.get('report') or storage.join(workdir, 'eval', name + '.json')
    storage.write_text(path, json.dumps(report, indent=1, ensure_ascii=False))
    storage.write_text(os.path.splitext(str(path))[0] + '.txt', '\n'.join(hyp) + '\n')
    return (f'{self.name} step {step} {split} {report["direction"]}: {len(src)} sentences, '
            f'beam {beam}: BLEU {bleu_score.score:.2f} chrF {chrf_score.score:.2f} | '
            f'{report["sentences_per_s"]:.1f} sentences/s ({wall:.1f} s)\n'
            f'  {bleu_score}\n  {report["bleu_signature"]}\nwrote {path}')
