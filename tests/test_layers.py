"""Tests for models/layers.py: masks, KV cache, cross attention, kernel choice (tiny shapes, CPU).

References are independent of the code under test: attention is recomputed in numpy from the
params, and the masked/causal properties are checked by perturbing inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import layers

D, H, B = 16, 4, 2


def _x(batch, seq, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch * seq, D))


def _block(cross=False, seed=0, dropout=0.0, dropout_bits=32):
  return layers.Block(embed_dim=D, num_heads=H, dropout=dropout, init_std=0.3,
                      out_init_std=0.2, cross_attention=cross, rngs=nnx.Rngs(seed),
                      dropout_bits=dropout_bits)


def _numpy_attention(q, k, v, mask):
  """q [B,T,H,Dh], k/v [B,S,H,Dh], mask broadcastable to [B,H,T,S] -> [B,T,H,Dh] (numpy)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.broadcast_to(mask, scores.shape), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', probs, v)


# ------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize('implementation', ['einsum', 'xla'])
def test_attention_matches_numpy_with_padding_and_causal(implementation):
  q, k, v = jax.random.normal(jax.random.key(1), (3, B, 7, H, 8))
  valid = jnp.array([[1] * 7, [1] * 4 + [0] * 3], bool)
  mask = layers.padding_mask(valid)
  got = layers.dot_product_attention(q, k, v, mask, is_causal=True,
                                     implementation=implementation)
  causal = np.tril(np.ones((7, 7), bool))
  want = _numpy_attention(q, k, v, np.asarray(mask) & causal)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_einsum_and_fused_gradients_agree():
  q, k, v = jax.random.normal(jax.random.key(2), (3, B, 6, H, 8))
  mask = layers.padding_mask(jnp.array([[1] * 6, [1] * 2 + [0] * 4], bool))

  def grads(impl):
    f = lambda *a: jnp.sum(jnp.sin(layers.dot_product_attention(
        *a, mask, is_causal=True, implementation=impl)))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  for a, b in zip(grads('einsum'), grads('xla')):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_implementation_choice():
  choose = layers.attention_implementation
  assert choose(None, False, backend='cpu') == 'einsum'
  assert choose(None, False, backend='gpu') == 'xla'
  assert choose(None, False, backend='tpu') == 'xla'
  assert choose(None, True, backend='gpu') == 'einsum'  # the fused kernels have no dropout
  assert choose('cudnn', False, backend='gpu') == 'cudnn'
  assert choose('einsum', True, backend='gpu') == 'einsum'
  assert choose('xla', False, backend='cpu') == 'xla'
  with pytest.raises(ValueError, match='dropout'):
    choose('cudnn', True, backend='gpu')
  with pytest.raises(ValueError, match='flash'):
    choose('flash', False)
  with pytest.raises(ValueError, match='flash'):
    layers.MultiHeadAttention(embed_dim=D, num_heads=H, init_std=0.1, implementation='flash',
                              rngs=nnx.Rngs(0))


def test_fully_masked_row_is_finite():
  q, k, v = jax.random.normal(jax.random.key(3), (3, 1, 3, H, 8))
  mask = jnp.zeros((1, 1, 3, 3), bool)
  assert np.all(np.isfinite(layers.dot_product_attention(q, k, v, mask,
                                                         implementation='einsum')))


def test_masks():
  np.testing.assert_array_equal(layers.causal_mask(3)[0, 0],
                                [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
  valid = jnp.array([[True, False]])
  assert layers.padding_mask(valid).shape == (1, 1, 1, 2)
  both = layers.combine_masks(layers.causal_mask(2), None, layers.padding_mask(valid))
  np.testing.assert_array_equal(both[0, 0], [[1, 0], [1, 0]])
  assert layers.combine_masks(None, None) is None


# ------------------------------------------------------------------------------ modules


def test_self_attention_is_head_major_numpy_reference():
  attn = layers.MultiHeadAttention(embed_dim=D, num_heads=H, init_std=0.3, rngs=nnx.Rngs(4))
  x = _x(B, 5)
  got = attn(x, batch=B, seq=5)
  w = np.asarray(attn.qkv.kernel[...]).reshape(D, H, 3, D // H)  # head-major columns
  b = np.asarray(attn.qkv.bias[...]).reshape(H, 3, D // H)
  qkv = np.einsum('nd,dhcf->nhcf', np.asarray(x), w) + b
  qkv = qkv.reshape(B, 5, H, 3, D // H)
  y = _numpy_attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], np.ones((1,), bool))
  want = y.reshape(B * 5, D) @ np.asarray(attn.proj.kernel[...]) + np.asarray(attn.proj.bias[...])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_padding_content_never_changes_real_positions():
  block = _block()
  seq, lengths = 6, jnp.array([6, 3])
  valid = jnp.arange(seq)[None, :] < lengths[:, None]
  mask = layers.padding_mask(valid)
  x = _x(B, seq).reshape(B, seq, D)
  noise = 10 * jax.random.normal(jax.random.key(9), x.shape)
  x2 = jnp.where(valid[..., None], x, noise)  # same real tokens, other padding content
  run = lambda x: block(x.reshape(B * seq, D), batch=B, seq=seq, mask=mask).reshape(B, seq, D)
  a, b = np.asarray(run(x)), np.asarray(run(x2))
  real = np.asarray(valid)
  np.testing.assert_allclose(a[real], b[real], rtol=0, atol=1e-6)
  assert np.abs(a[~real] - b[~real]).max() > 1e-2  # the padding positions did change
  # Without the mask the padding leaks in: the test would notice a mask that does nothing.
  leaky = lambda x: block(x.reshape(B * seq, D), batch=B, seq=seq).reshape(B, seq, D)
  assert np.abs(np.asarray(leaky(x))[1, :3] - np.asarray(leaky(x2))[1, :3]).max() > 1e-3


def test_causal_block_never_sees_the_future_and_bidirectional_does():
  block, seq, j = _block(), 8, 5
  x = _x(B, seq, seed=1)
  # (A non-constant change: LayerNorm removes a constant shift.)
  delta = jax.random.normal(jax.random.key(8), (D,))
  x2 = x.reshape(B, seq, D).at[:, j].add(delta).reshape(B * seq, D)
  for causal in (True, False):
    run = lambda x: np.asarray(block(x, batch=B, seq=seq, is_causal=causal)).reshape(B, seq, D)
    diff = np.abs(run(x) - run(x2)).max(axis=(0, 2))
    if causal:
      np.testing.assert_array_equal(diff[:j], 0)
      assert np.all(diff[j:] > 1e-4)
    else:
      assert np.all(diff > 1e-4)  # positions before j see it too


def test_cross_attention_reads_the_context_and_ignores_its_padding():
  block = _block(cross=True)
  tgt, src = 4, 5
  x, context = _x(B, tgt, seed=2), _x(B, src, seed=3)
  src_valid = jnp.array([[True] * 5, [True] * 2 + [False] * 3])
  cmask = layers.padding_mask(src_valid)

  def run(context):
    kv = block.context_kv(context, batch=B, seq=src)
    return np.asarray(block(x, batch=B, seq=tgt, is_causal=True, context_kv=kv,
                            context_mask=cmask)).reshape(B, tgt, D)

  base = run(context)
  ctx = context.reshape(B, src, D)
  # Another real source token: every target position changes.
  delta = jax.random.normal(jax.random.key(8), (D,))
  changed = run(ctx.at[:, 1].add(delta).reshape(B * src, D))
  assert np.all(np.abs(changed - base).max(axis=-1) > 1e-4)
  # Other source padding: nothing changes.
  noise = 5 * jax.random.normal(jax.random.key(9), ctx.shape)
  repadded = run(jnp.where(src_valid[..., None], ctx, noise).reshape(B * src, D))
  np.testing.assert_allclose(repadded, base, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match='context_kv'):
    block(x, batch=B, seq=tgt)


@pytest.mark.parametrize('cross', [False, True])
def test_kv_cached_decode_equals_full_recompute(cross):
  blocks = [_block(cross=cross, seed=s) for s in range(2)]
  seq, src, prompt_len, cache_len = 7, 5, 3, 9
  x = _x(B, seq, seed=4)
  context = _x(B, src, seed=5)
  cmask = layers.padding_mask(jnp.array([[True] * 5, [True] * 3 + [False] * 2])) if cross else None
  kvs = [b.context_kv(context, batch=B, seq=src) if cross else None for b in blocks]

  h = x
  for b, kv in zip(blocks, kvs):
    h = b(h, batch=B, seq=seq, is_causal=True, context_kv=kv, context_mask=cmask)
  full = np.asarray(h).reshape(B, seq, D)

  caches = [layers.init_kv_cache(B, cache_len, H, D // H) for _ in blocks]
  # Stale entries past the prompt (as after an earlier, longer prefill) must be masked out.
  caches = [{n: c + 3.0 for n, c in cache.items()} for cache in caches]
  h = x.reshape(B, seq, D)[:, :prompt_len].reshape(B * prompt_len, D)
  for i, (b, kv) in enumerate(zip(blocks, kvs)):
    h, caches[i] = b.prefill(h, batch=B, seq=prompt_len, cache=caches[i], context_kv=kv,
                             context_mask=cmask)
  got = [np.asarray(h).reshape(B, prompt_len, D)]

  @jax.jit
  def step(x_pos, pos, caches):
    new = []
    for b, kv, cache in zip(blocks, kvs, caches):
      x_pos, cache = b.decode(x_pos, pos, cache, context_kv=kv, context_mask=cmask)
      new.append(cache)
    return x_pos, new

  for pos in range(prompt_len, seq):
    out, caches = step(x.reshape(B, seq, D)[:, pos], jnp.int32(pos), caches)
    got.append(np.asarray(out)[:, None])
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=0, atol=2e-5)


def test_decode_extra_mask_hides_cache_positions():
  attn = layers.MultiHeadAttention(embed_dim=D, num_heads=H, init_std=0.3, rngs=nnx.Rngs(6))
  x = _x(1, 4, seed=7)
  cache = layers.init_kv_cache(1, 4, H, D // H)
  _, cache = attn.prefill(x[:3], batch=1, seq=3, cache=cache)
  hide = jnp.array([True, False, True, True])[None, None, None, :]  # position 1 is padding
  got, _ = attn.decode(x[3:], jnp.int32(3), cache, mask=hide)
  keep = jnp.array([0, 2, 3])
  want = attn(x[keep], batch=1, seq=3, is_causal=True)[-1]
  np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)


def test_dropout_keys():
  block = _block(dropout=0.3)
  x = _x(B, 5)
  run = lambda key: block(x, batch=B, seq=5, dropout_key=key)
  np.testing.assert_array_equal(run(None), run(None))
  np.testing.assert_array_equal(run(jax.random.key(0)), run(jax.random.key(0)))
  assert float(jnp.abs(run(jax.random.key(0)) - run(jax.random.key(1))).max()) > 1e-3
  assert float(jnp.abs(run(jax.random.key(0)) - run(None)).max()) > 1e-3
  # 8-bit masks: the same params and no-dropout output, other masks for the same key.
  block8 = _block(dropout=0.3, dropout_bits=8)
  run8 = lambda key: block8(x, batch=B, seq=5, dropout_key=key)
  np.testing.assert_array_equal(run8(None), run(None))
  np.testing.assert_array_equal(run8(jax.random.key(0)), run8(jax.random.key(0)))
  assert float(jnp.abs(run8(jax.random.key(0)) - run(jax.random.key(0))).max()) > 1e-3
  # ... in the attention probabilities too, where the output projection's dropout is not.
  for b in (block, block8):
    b.attn.proj.kernel[...] = jnp.eye(D)
  probs = lambda blk: blk.attn(x, batch=B, seq=5, dropout_keys=(jax.random.key(0), None))
  assert float(jnp.abs(probs(block8) - probs(block)).max()) > 1e-3


def test_dropout_32_bits_is_bernoulli_and_bad_widths_are_errors():
  x = jax.random.normal(jax.random.key(3), (64, 33))
  keep = jax.random.bernoulli(jax.random.key(4), 0.75, x.shape)
  out = np.asarray(layers.dropout(x, 0.25, jax.random.key(4)))
  np.testing.assert_array_equal(out != 0, keep)
  np.testing.assert_allclose(out, np.where(keep, np.asarray(x) / 0.75, 0.0), rtol=1e-6)
  for bits in (8, 16, 32):
    assert layers.dropout(x, 0.25, None, bits) is x
  with pytest.raises(ValueError, match='bits=12'):
    layers.dropout(x, 0.25, jax.random.key(4), 12)
  with pytest.raises(ValueError, match='dropout_bits=12'):   # at construction, not first call
    _block(dropout=0.1, dropout_bits=12)
  with pytest.raises(ValueError, match='rounds to 1'):
    layers.dropout(x, 0.999, jax.random.key(4), 8)
  # A rate below half a level rounds to no dropout at all.
  assert layers.dropout(x, 0.001, jax.random.key(4), 8) is x


@pytest.mark.parametrize('bits', [8, 16])
def test_packed_dropout_masks_are_fair_independent_and_unbiased(bits):
  n, rate = 2 ** 22, 0.1
  levels = 2 ** bits
  dropped = round(rate * levels)           # 26 / 256 at 8 bits: 0.1016, not 0.1
  keep_p = 1 - dropped / levels
  out = np.asarray(layers.dropout(jnp.ones((n // 64, 64)), rate, jax.random.key(7), bits))
  # Exactly two values: 0, and the inverse of the exact kept fraction.
  kept = out != 0
  np.testing.assert_array_equal(np.unique(out), [0.0, np.float32(levels / (levels - dropped))])
  # The kept fraction is the rounded rate's, within 5 binomial sigmas (at 8 bits the unrounded
  # 0.9 lies 10 sigmas away), in each of the numbers that share a 32-bit word too.
  per_word = kept.reshape(-1, 32 // bits)
  for col in range(per_word.shape[1]):
    sigma = np.sqrt(keep_p * (1 - keep_p) / per_word.shape[0])
    assert abs(per_word[:, col].mean() - keep_p) < 5 * sigma, (col, per_word[:, col].mean())
  # Numbers cut from one word are independent: both dropped as often as chance says.
  both = (~per_word[:, 0] & ~per_word[:, 1]).mean()
  q2 = (1 - keep_p) ** 2
  assert abs(both - q2) < 5 * np.sqrt(q2 * (1 - q2) / per_word.shape[0]), both
  # E[output] = input.
  assert abs(out.mean() - 1.0) < 5 * out.std() / np.sqrt(n), out.mean()
  # Deterministic in the key, another mask for another key or width, the dtype kept.
  x = jnp.ones((128, 64), jnp.bfloat16)
  a, b = (layers.dropout(x, rate, jax.random.key(k), bits) for k in (1, 2))
  assert a.dtype == jnp.bfloat16
  np.testing.assert_array_equal(a, layers.dropout(x, rate, jax.random.key(1), bits))
  assert (np.asarray(a) != np.asarray(b)).any()
  assert (np.asarray(a) != np.asarray(layers.dropout(x, rate, jax.random.key(1), 32))).any()


def test_embeddings_and_tied_logits():
  emb = layers.Embeddings(vocab_size=11, max_len=6, embed_dim=D, init_std=0.5, rngs=nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 3], [4, 5, 10]])
  wte, wpe = np.asarray(emb.wte.embedding[...]), np.asarray(emb.wpe.embedding[...])
  np.testing.assert_allclose(emb(tokens), (wte[tokens] + wpe[:3]).reshape(6, D), rtol=1e-6)
  h = _x(1, 3)
  np.testing.assert_allclose(emb.logits(h), np.asarray(h) @ wte.T, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='max_len'):
    emb(jnp.zeros((1, 7), jnp.int32))
