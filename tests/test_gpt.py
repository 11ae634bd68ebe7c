"""Tests for models/gpt.py (tiny shapes, CPU)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import gpt

VOCAB, BLOCK, LAYERS, HEADS, EMBED = 37, 16, 2, 2, 32


def _model(dropout=0.0, dtype=jnp.float32, seed=0):
  return gpt.GPT(vocab_size=VOCAB, block_size=BLOCK, num_layers=LAYERS, num_heads=HEADS,
                 embed_dim=EMBED, dropout=dropout, dtype=dtype, rngs=nnx.Rngs(seed))


@pytest.fixture(scope='module')
def model():
  return _model()


def _tokens(batch, seq, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB, dtype=jnp.int32)


# ------------------------------------------------------------------------------ forward


def test_forward_shape_and_dtype(model):
  logits = model(_tokens(2, BLOCK))
  assert logits.shape == (2, BLOCK, VOCAB)
  assert logits.dtype == jnp.float32
  with pytest.raises(ValueError):
    model(_tokens(1, BLOCK + 1))


def test_causality(model):
  tokens = _tokens(2, 12)
  j = 7
  changed = tokens.at[:, j].set((tokens[:, j] + 1) % VOCAB)
  a, b = np.asarray(model(tokens)), np.asarray(model(changed))
  np.testing.assert_allclose(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
  # Every later position sees the change.
  assert np.all(np.abs(a[:, j:] - b[:, j:]).max(axis=-1) > 1e-4)


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize('prompt_len', [1, 5])
def test_prefill_then_decode_matches_forward(model, prompt_len):
  tokens = _tokens(2, BLOCK, seed=3)
  full = np.asarray(model(tokens))
  logits, cache = model.prefill(tokens[:, :prompt_len], model.init_cache(2))
  got = [np.asarray(logits)]
  decode = jax.jit(model.decode)
  for pos in range(prompt_len, BLOCK):
    step_logits, cache = decode(tokens[:, pos], jnp.int32(pos), cache)
    got.append(np.asarray(step_logits)[:, None])
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=0, atol=2e-5)


def test_cache_layout(model):
  cache = model.init_cache(3)
  assert len(cache) == LAYERS
  for layer in cache:
    for name in ('k', 'v'):
      assert layer[name].shape == (3, BLOCK, HEADS, EMBED // HEADS)
      assert layer[name].dtype == jnp.float32


def test_decode_ignores_stale_cache_entries(model):
  # After a long prefill, a shorter prefill leaves stale entries past its end (as the
  # sliding window does); decode must mask them.
  long, short = _tokens(1, BLOCK, seed=4), _tokens(1, 6, seed=5)
  prefill = jax.jit(model.prefill)
  _, cache = prefill(long, model.init_cache(1))
  _, cache = prefill(short[:, :5], cache)
  logits, _ = jax.jit(model.decode)(short[:, 5], jnp.int32(5), cache)
  np.testing.assert_allclose(logits, model(short)[:, -1], rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- sampling


def test_top_k_filter_keeps_exactly_k_largest():
  logits = jax.random.normal(jax.random.key(0), (3, 50))
  out = np.asarray(gpt.top_k_filter(logits, 7))
  for row, orig in zip(out, np.asarray(logits)):
    kept = np.flatnonzero(np.isfinite(row))
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-orig)[:7]))
    np.testing.assert_array_equal(row[kept], orig[kept])
  # Ties: exactly k kept, lower index first.
  tied = gpt.top_k_filter(jnp.array([1., 3., 3., 3., 0.]), 2)
  np.testing.assert_array_equal(np.isfinite(tied), [False, True, True, False, False])
  np.testing.assert_array_equal(gpt.top_k_filter(logits, 50), logits)
  with pytest.raises(ValueError):
    gpt.top_k_filter(logits, 0)


@pytest.mark.parametrize('p,kept', [(0.8, 2), (0.81, 3), (0.5, 1), (0.3, 1), (0.96, 4),
                                    (1.0, 4)])
def test_top_p_filter_hand_computed(p, kept):
  probs = np.array([0.15, 0.5, 0.05, 0.3])  # shuffled: ranks are 1, 3, 0, 2
  rank_order = [1, 3, 0, 2]
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  out = np.asarray(gpt.top_p_filter(jnp.stack([logits, logits + 2.0]), p))
  expected = np.zeros(4, bool)
  expected[rank_order[:kept]] = True
  for row in out:
    np.testing.assert_array_equal(np.isfinite(row), expected)
  np.testing.assert_allclose(out[0][expected], np.asarray(logits)[expected], rtol=1e-6)


def test_sample_logits():
  logits = jax.random.normal(jax.random.key(0), (64, 20)) * 3
  key = jax.random.key(1)
  np.testing.assert_array_equal(gpt.sample_logits(logits, key, temperature=0.0),
                                jnp.argmax(logits, -1))
  a = gpt.sample_logits(logits, key, 1.0, top_k=5, top_p=0.9)
  b = gpt.sample_logits(logits, key, 1.0, top_k=5, top_p=0.9)
  np.testing.assert_array_equal(a, b)
  c = gpt.sample_logits(logits, jax.random.key(2), 1.0, top_k=5, top_p=0.9)
  assert np.any(np.asarray(a) != np.asarray(c))
  # Samples stay inside the top-3 set; top_k=1 is argmax.
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  s = np.asarray(gpt.sample_logits(logits, key, 2.0, top_k=3))
  assert all(t in row for t, row in zip(s, top3))
  np.testing.assert_array_equal(gpt.sample_logits(logits, key, 1.0, top_k=1),
                                jnp.argmax(logits, -1))
  # A traced temperature of 0 is greedy too.
  greedy = jax.jit(gpt.sample_logits)(logits, key, jnp.float32(0.0))
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))


# --------------------------------------------------------------------------- generation

SAMPLERS = [dict(temperature=0.0), dict(temperature=1.0, top_k=10),
            dict(temperature=0.9, top_p=0.9)]


@pytest.mark.parametrize('kwargs', SAMPLERS)
def test_generate_matches_full_recompute_within_block(model, kwargs):
  prompt = _tokens(2, 4, seed=6)
  n = BLOCK - 4 + 1  # every token is conditioned on at most BLOCK tokens
  key = jax.random.key(7)
  cached = gpt.generate(model, prompt, key, max_new_tokens=n, **kwargs)
  full = gpt.generate_full_recompute(model, prompt, key, max_new_tokens=n, **kwargs)
  assert cached.shape == (2, n) and cached.dtype == jnp.int32
  np.testing.assert_array_equal(cached, full)


def _sliding_reference(model, prompt, n):
  """Greedy generation with generate's documented window rule, by full forwards."""
  half = BLOCK // 2
  last_logits = jax.jit(model.logits_at)  # padded to BLOCK: compiles once
  out, context = [], list(np.asarray(prompt[0])[-BLOCK:])
  for _ in range(n):
    padded = jnp.asarray([context + [0] * (BLOCK - len(context))], jnp.int32)
    token = int(jnp.argmax(last_logits(padded, len(context) - 1)[0]))
    out.append(token)
    context.append(token)
    if len(context) > BLOCK:
      context = context[-half:]
  return out


def _context_sensitive_model():
  """A model whose greedy choice depends on the whole context: at the 0.02 init scale
  the next token mostly follows from the last one, which would hide window bugs."""
  model = _model(seed=1)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x * 6.0 if x.ndim == 2 else x, state)
  return nnx.merge(graphdef, state)


def test_generate_past_block(model):
  sharp = _context_sensitive_model()
  prompt = _tokens(1, 5, seed=8)
  n = 3 * BLOCK
  greedy = gpt.generate(sharp, prompt, jax.random.key(0), max_new_tokens=n, temperature=0)
  np.testing.assert_array_equal(greedy[0], _sliding_reference(sharp, prompt, n))
  assert len(set(np.asarray(greedy[0]).tolist())) > 5  # not a degenerate repeat

  key = jax.random.key(9)
  a = gpt.generate(model, _tokens(2, 5), key, max_new_tokens=n, top_k=20)
  b = gpt.generate(model, _tokens(2, 5), key, max_new_tokens=n, top_k=20)
  c = gpt.generate(model, _tokens(2, 5), jax.random.key(10), max_new_tokens=n, top_k=20)
  assert a.shape == (2, n) and a.dtype == jnp.int32
  assert int(a.min()) >= 0 and int(a.max()) < VOCAB
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))
  # Identical to nanoGPT's generate until the first window slide.
  full = gpt.generate_full_recompute(model, _tokens(2, 5), key, max_new_tokens=n, top_k=20)
  np.testing.assert_array_equal(a[:, :BLOCK - 5 + 1], full[:, :BLOCK - 5 + 1])


def test_long_prompt_is_cropped(model):
  prompt = _tokens(2, 2 * BLOCK + 3, seed=11)
  key = jax.random.key(0)
  a = gpt.generate(model, prompt, key, max_new_tokens=4)
  b = gpt.generate(model, prompt[:, -BLOCK:], key, max_new_tokens=4)
  np.testing.assert_array_equal(a, b)
  assert gpt.generate(model, prompt, key, max_new_tokens=0).shape == (2, 0)


# ---------------------------------------------------------------------- dropout, dtypes


def test_dropout():
  model = _model(dropout=0.2)
  tokens = _tokens(2, BLOCK)
  np.testing.assert_array_equal(model(tokens), model(tokens))
  a = model(tokens, dropout_key=jax.random.key(0))
  b = model(tokens, dropout_key=jax.random.key(1))
  assert float(jnp.abs(a - b).max()) > 1e-3
  assert float(jnp.abs(a - model(tokens)).max()) > 1e-3
  np.testing.assert_array_equal(a, model(tokens, dropout_key=jax.random.key(0)))
  # Gradients flow through the dropout path under plain jax.grad on split state.
  graphdef, state = nnx.split(model)
  grads = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(
      tokens, dropout_key=jax.random.key(0)).mean()))(state)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_bf16_activations_f32_params():
  model = _model(dtype=jnp.bfloat16)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  tokens = _tokens(2, BLOCK)
  logits = model(tokens)
  assert logits.dtype == jnp.float32
  assert model.init_cache(1)[0]['k'].dtype == jnp.bfloat16
  # Same params in f32 give close logits.
  ref = _model(dtype=jnp.float32)(tokens)
  np.testing.assert_allclose(logits, ref, atol=0.05)
  out = gpt.generate(model, tokens[:, :3], jax.random.key(0), max_new_tokens=5)
  assert out.shape == (2, 5)


# ------------------------------------------------------------------- params, init, FLOPs


def test_tied_embeddings_and_param_count(model):
  d = EMBED
  per_layer = 12 * d * d + 13 * d  # qkv, proj, fc, proj weights + biases, two LayerNorms
  expected = VOCAB * d + BLOCK * d + LAYERS * per_layer + 2 * d  # no separate lm_head
  assert gpt.num_params(model) == expected
  assert gpt.num_params(model, include_embeddings=False) == expected - BLOCK * d
  # The output projection is the token embedding: editing the row of a token absent
  # from the input changes exactly that logit column.
  tokens = jnp.zeros((1, 4), jnp.int32)
  before = model(tokens)
  graphdef, state = nnx.split(model)
  edited = nnx.merge(graphdef, state)
  # (A non-constant change: LayerNorm output is zero-mean, so a constant shift is a no-op.)
  delta = jax.random.normal(jax.random.key(0), (EMBED,))
  edited.wte.embedding[...] = edited.wte.embedding[...].at[5].add(delta)
  after = edited(tokens)
  diff = np.abs(np.asarray(after - before)).max(axis=(0, 1))
  assert diff[5] > 1e-3 and np.delete(diff, 5).max() == 0


@pytest.mark.parametrize('init_std, std', [(None, 128 ** -0.5), (0.02, 0.02)])
def test_init_scales(init_std, std):
  model = gpt.GPT(vocab_size=64, block_size=32, num_layers=8, num_heads=4, embed_dim=128,
                  init_std=init_std, rngs=nnx.Rngs(0))
  block = model.blocks[0]
  assert abs(float(jnp.std(block.mlp.fc.kernel[...])) - std) < 0.1 * std
  assert abs(float(jnp.std(model.wte.embedding[...])) - std) < 0.1 * std
  resid = std / math.sqrt(2 * 8)
  assert abs(float(jnp.std(block.mlp.proj.kernel[...])) - resid) < 0.1 * resid
  assert abs(float(jnp.std(block.attn.proj.kernel[...])) - resid) < 0.1 * resid
  assert float(jnp.abs(block.attn.qkv.bias[...]).max()) == 0


def test_flops_per_token():
  assert gpt.flops_per_token(1000, num_layers=2, block_size=8, embed_dim=4) == 6000 + 768


@pytest.mark.parametrize('implementation', ['xla', 'einsum'])
def test_attention_implementations_agree(implementation):
  """The CPU attention path (einsum) and XLA's fused attention (accelerators' default) give the
  same model: logits and gradients, from the same params."""
  model = _model()  # not the shared fixture: test_tied_embeddings_and_param_count edits it
  other = gpt.GPT(vocab_size=VOCAB, block_size=BLOCK, num_layers=LAYERS, num_heads=HEADS,
                  embed_dim=EMBED, attention_implementation=implementation, rngs=nnx.Rngs(0))
  tokens = _tokens(2, BLOCK, seed=12)
  np.testing.assert_allclose(other(tokens), model(tokens), rtol=1e-5, atol=1e-5)

  def grads(m):
    graphdef, state = nnx.split(m)
    return jax.grad(lambda s: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(tokens))))(state)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads(other), grads(model))


# ----------------------------------------------------------------------- prompt tuning


def _with_soft_prompt(base, ids):
  """`base` plus a soft prompt equal to the embeddings of token `ids` (Lester et al.'s
  initialisation from vocabulary): it must then act exactly as those tokens would."""
  tuned = gpt.GPT(vocab_size=VOCAB, block_size=BLOCK, num_layers=LAYERS, num_heads=HEADS,
                  embed_dim=EMBED, prompt_tokens=len(ids), rngs=nnx.Rngs(5))
  nnx.update(tuned, nnx.state(base))
  tuned.prompt[...] = base.wte.embedding[...][jnp.asarray(ids)]
  return tuned


def test_soft_prompt_equals_the_tokens_it_embeds(model):
  ids = [3, 14, 15]
  tuned = _with_soft_prompt(model, ids)
  tokens = _tokens(2, BLOCK - len(ids), seed=12)
  with_tokens = jnp.concatenate([jnp.tile(jnp.asarray(ids, jnp.int32), (2, 1)), tokens], 1)
  np.testing.assert_allclose(tuned(tokens), model(with_tokens)[:, len(ids):], atol=1e-5)
  assert tuned.context_size == BLOCK - len(ids)
  with pytest.raises(ValueError, match='prompt vectors'):
    tuned(_tokens(1, BLOCK - 2))
  # Cached sampling after the soft prompt: as full recompute, and as the base given the ids.
  prompt = _tokens(2, 4, seed=13)
  n = tuned.context_size - 4 + 1
  key = jax.random.key(3)
  cached = gpt.generate(tuned, prompt, key, max_new_tokens=n, temperature=0)
  np.testing.assert_array_equal(
      cached, gpt.generate_full_recompute(tuned, prompt, key, max_new_tokens=n, temperature=0))
  base_prompt = jnp.concatenate([jnp.tile(jnp.asarray(ids, jnp.int32), (2, 1)), prompt], 1)
  np.testing.assert_array_equal(
      cached, gpt.generate(model, base_prompt, key, max_new_tokens=n, temperature=0))


def test_soft_prompt_bounds():
  with pytest.raises(ValueError, match='prompt_tokens'):
    gpt.GPT(vocab_size=VOCAB, block_size=BLOCK, num_layers=1, num_heads=1, embed_dim=8,
            prompt_tokens=BLOCK, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('prompt_tokens', [0, 3])
def test_greedy_continue_equals_generate_row_by_row(prompt_tokens):
  sharp = _context_sensitive_model()
  if prompt_tokens:
    sharp = _with_soft_prompt(sharp, [5, 6, 7])
  lengths = np.array([1, 4, 7, 2])
  prompts = np.asarray(_tokens(4, 7, seed=14))
  n = sharp.context_size - 7
  out = gpt.greedy_continue(sharp, prompts, lengths, max_new_tokens=n)
  assert out.shape == (4, n)
  for row, length in enumerate(lengths):
    alone = gpt.generate(sharp, jnp.asarray(prompts[row:row + 1, :length]), jax.random.key(0),
                         max_new_tokens=n, temperature=0)
    np.testing.assert_array_equal(out[row], alone[0])
  with pytest.raises(ValueError, match='positions'):
    gpt.greedy_continue(sharp, prompts, lengths, max_new_tokens=n + 1)


def test_gpt_family_builds_its_model_with_the_configured_dropout_bits():
  """config.model.dropout_bits reaches every dropout of the GPT the family builds (embedding,
  attention probabilities and outputs, MLP), and only the masks change."""
  from experiments.configs import gpt_shakespeare   # pylint: disable=import-outside-toplevel
  from train.families.gpt import GPTFamily          # pylint: disable=import-outside-toplevel

  class Family(GPTFamily):
    def _vocab_size(self):
      return 29

  def build(bits):
    config = gpt_shakespeare.get_config('tiny')
    config.model.update(dropout=0.2, dropout_bits=bits)
    return Family(config).make_models(nnx.Rngs(0))['model']

  m32, m8 = build(32), build(8)
  blocks = list(m8.blocks)
  assert m8.dropout_bits == 8 and m32.dropout_bits == 32
  assert {b.attn.dropout_bits for b in blocks} == {b.mlp.dropout_bits for b in blocks} == {8}
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 29)
  np.testing.assert_array_equal(m8(tokens), m32(tokens))
  key = jax.random.key(2)
  assert float(jnp.abs(m8(tokens, dropout_key=key) - m32(tokens, dropout_key=key)).max()) > 1e-3
