"""Tests of models/seq2seq.py and models/decoding.py: masks, KV cache, greedy and beam search."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import decoding
from models import seq2seq

V, PAD, BOS, EOS = 11, 0, 1, 2


def _model(seed=0, max_len=12, **kw):
  args = dict(vocab_size=V, num_encoder_layers=2, num_decoder_layers=2, num_heads=2,
              embed_dim=16, mlp_dim=32, dropout=0.0, max_len=max_len)
  args.update(kw)
  return seq2seq.Seq2Seq(**args, rngs=nnx.Rngs(seed))


def _batch(src, tgt_in):
  """An unpacked batch: one segment per row, padding = 0."""
  src, tgt_in = np.asarray(src, np.int32), np.asarray(tgt_in, np.int32)
  pos = lambda x: np.broadcast_to(np.arange(x.shape[1]), x.shape).astype(np.int32)
  return {'src': src, 'src_seg': (src != PAD).astype(np.int32), 'src_pos': pos(src),
          'tgt_in': tgt_in, 'tgt_seg': (tgt_in != PAD).astype(np.int32), 'tgt_pos': pos(tgt_in)}


def _rand_tokens(rng, shape, lo=3):
  return rng.integers(lo, V, size=shape).astype(np.int32)


def test_decoder_sees_only_the_past_and_encoder_both_directions():
  model = _model()
  rng = np.random.default_rng(0)
  src, tgt = _rand_tokens(rng, (2, 7)), _rand_tokens(rng, (2, 6))
  tgt[:, 0] = BOS
  base = np.asarray(model(_batch(src, tgt)))
  t = 3
  changed = tgt.copy()
  changed[:, t] = (changed[:, t] - 3 + 1) % (V - 3) + 3
  out = np.asarray(model(_batch(src, changed)))
  np.testing.assert_array_equal(out[:, :t], base[:, :t])  # the past: untouched
  assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4   # position t and later: changed
  # The encoder is bidirectional: changing the LAST source token changes the first one's state.
  memory = lambda s: np.asarray(model.encode(s, np.ones_like(s), np.broadcast_to(
      np.arange(s.shape[1]), s.shape))).reshape(2, 7, -1)
  src2 = src.copy()
  src2[:, -1] = (src2[:, -1] - 3 + 1) % (V - 3) + 3
  assert np.abs(memory(src2)[:, 0] - memory(src)[:, 0]).max() > 1e-4


def test_cross_attention_reads_the_encoder_output():
  model = _model()
  rng = np.random.default_rng(1)
  src, tgt = _rand_tokens(rng, (2, 5)), _rand_tokens(rng, (2, 4))
  tgt[:, 0] = BOS
  b = _batch(src, tgt)
  base = np.asarray(model(b))
  # Any source change reaches every target position, through cross-attention only.
  src2 = src.copy()
  src2[:, 2] = (src2[:, 2] - 3 + 1) % (V - 3) + 3
  out = np.asarray(model(_batch(src2, tgt)))
  assert (np.abs(out - base).max(axis=-1) > 1e-5).all()
  # Zeroing the cross-attention output projection makes the source irrelevant.
  for block in model.decoder:
    block.cross_attn.proj.kernel[...] = jnp.zeros_like(block.cross_attn.proj.kernel[...])
    block.cross_attn.proj.bias[...] = jnp.zeros_like(block.cross_attn.proj.bias[...])
  np.testing.assert_allclose(np.asarray(model(_batch(src2, tgt))), np.asarray(model(b)),
                             atol=1e-6)


def test_padding_and_packing_do_not_change_real_positions():
  model = _model()
  rng = np.random.default_rng(2)
  s1, s2 = _rand_tokens(rng, 4), _rand_tokens(rng, 3)
  t1, t2 = _rand_tokens(rng, 3), _rand_tokens(rng, 5)
  t1[0] = t2[0] = BOS
  alone1 = np.asarray(model(_batch(s1[None], t1[None])))[0]
  alone2 = np.asarray(model(_batch(s2[None], t2[None])))[0]
  # Both pairs packed into one row (segments 1, 2; positions restart) with garbage padding.
  src = np.concatenate([s1, s2, [7, 7]])[None].astype(np.int32)
  tgt = np.concatenate([t1, t2, [9]])[None].astype(np.int32)
  packed = {'src': src, 'src_seg': np.asarray([[1] * 4 + [2] * 3 + [0, 0]], np.int32),
            'src_pos': np.asarray([[0, 1, 2, 3, 0, 1, 2, 0, 0]], np.int32),
            'tgt_in': tgt, 'tgt_seg': np.asarray([[1] * 3 + [2] * 5 + [0]], np.int32),
            'tgt_pos': np.asarray([[0, 1, 2, 0, 1, 2, 3, 4, 0]], np.int32)}
  out = np.asarray(model(packed))[0]
  np.testing.assert_allclose(out[:3], alone1, atol=1e-5)
  np.testing.assert_allclose(out[3:8], alone2, atol=1e-5)


def test_kv_cached_decoding_equals_full_recompute():
  model = _model(seed=3, max_len=8)
  rng = np.random.default_rng(3)
  src = _rand_tokens(rng, (3, 6))
  src[1, 4:] = PAD  # a padded source
  start = model.init_decode(jnp.asarray(src), jnp.asarray(src != PAD), 8)
  step = lambda tokens, index, cache: model.decode_step(tokens, index, cache, start['cross'],
                                                        start['cross_mask'])
  # Logits at every step equal the full model's (teacher-forced on the same prefix).
  tgt = _rand_tokens(rng, (3, 8))
  tgt[:, 0] = BOS
  full = np.asarray(model(_batch(src, tgt)))
  cache = start['cache']
  for i in range(8):
    logits, cache = step(jnp.asarray(tgt[:, i]), jnp.int32(i), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, i], atol=1e-4)
  # And the greedy search over the cache picks what full recomputation picks (no EOS: the
  # toy model's EOS is banned so all 8 steps run).
  tokens, _ = decoding.greedy_search(step, start['cache'], batch_size=3, max_len=8,
                                     bos_id=BOS, eos_id=EOS, pad_id=PAD,
                                     banned_ids=(PAD, BOS, EOS))
  ref = _full_recompute_greedy_banned(model, src, 8)
  np.testing.assert_array_equal(np.asarray(tokens), ref)


def _full_recompute_greedy_banned(model, src, steps):
  tgt = np.full((src.shape[0], 1), BOS, np.int32)
  for _ in range(steps):
    logits = np.array(model(_batch(src, tgt)))[:, -1]
    logits[:, [PAD, BOS, EOS]] = -np.inf
    tgt = np.concatenate([tgt, logits.argmax(-1)[:, None].astype(np.int32)], 1)
  return tgt[:, 1:]


def _toy_lm(vocab, seed):
  """A fixed random 'decoder': next-token logits depend on (previous token, position); the
  cache is a dummy counter so beam reordering is exercised."""
  table = jax.random.normal(jax.random.key(seed), (vocab, 16, vocab)) * 2.0

  def step(tokens, index, cache):
    return table[tokens, index], {'n': cache['n'] + 1}
  return step, np.asarray(table)


def _exhaustive_best(table, max_len, alpha, banned):
  """Highest log P(y) / lp(|y|) over every sequence, scored independently of decoding.py."""
  vocab = table.shape[0]
  # The model's own probabilities: banned tokens are never generated, not renormalised away.
  logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
  allowed = [t for t in range(vocab) if t not in banned]
  best, best_seq = -np.inf, None
  for n in range(1, max_len + 1):
    for seq in itertools.product(allowed, repeat=n):
      if EOS in seq[:-1] or (n < max_len and seq[-1] != EOS):
        continue  # EOS only at the end; shorter than max_len only when ended by EOS
      prev, total = BOS, 0.0
      for i, t in enumerate(seq):
        total += logp[prev, i, t]
        prev = t
      score = total / ((5 + n) / 6) ** alpha
      if score > best:
        best, best_seq = score, seq
  return best, list(best_seq)


@pytest.mark.parametrize('alpha', [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_exhaustive_best(alpha):
  vocab, max_len = 6, 4  # tokens 3, 4, 5 and EOS: 3 ** 3 live prefixes at most
  banned = (PAD, BOS)
  for seed in range(3):
    step, table = _toy_lm(vocab, seed)
    tokens, scores = decoding.beam_search(
        step, {'n': jnp.zeros((32,), jnp.int32)}, batch_size=1, beam_size=32, max_len=max_len,
        bos_id=BOS, eos_id=EOS, pad_id=PAD, length_penalty=alpha, banned_ids=banned)
    best, seq = _exhaustive_best(table, max_len, alpha, banned)
    out = np.asarray(tokens)[0, 0]
    assert out[:len(seq)].tolist() == seq and (out[len(seq):] == PAD).all()
    assert math.isclose(float(scores[0, 0]), best, rel_tol=1e-5, abs_tol=1e-5)


def test_beam_size_one_equals_greedy():
  model = _model(seed=4, max_len=10)
  rng = np.random.default_rng(4)
  src = _rand_tokens(rng, (4, 5))
  start = model.init_decode(jnp.asarray(src), jnp.ones(src.shape, bool), 10)
  step = lambda tokens, index, cache: model.decode_step(tokens, index, cache, start['cross'],
                                                        start['cross_mask'])
  kw = dict(batch_size=4, max_len=10, bos_id=BOS, eos_id=EOS, pad_id=PAD, banned_ids=(PAD, BOS))
  greedy, greedy_lp = decoding.greedy_search(step, start['cache'], **kw)
  beam, beam_score = decoding.beam_search(step, start['cache'], beam_size=1,
                                          length_penalty=0.0, **kw)
  np.testing.assert_array_equal(np.asarray(beam[:, 0]), np.asarray(greedy))
  np.testing.assert_allclose(np.asarray(beam_score[:, 0]), np.asarray(greedy_lp), rtol=1e-5)


def test_bad_decoding_arguments():
  step, _ = _toy_lm(6, 0)
  with pytest.raises(ValueError, match='beam_size'):
    decoding.beam_search(step, {'n': jnp.zeros((1,))}, batch_size=1, beam_size=0, max_len=3,
                         bos_id=BOS, eos_id=EOS, pad_id=PAD)
  with pytest.raises(ValueError, match='max_len'):
    _model(max_len=4).init_decode(jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), bool), 5)
