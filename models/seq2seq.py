"""Encoder-decoder transformer (Vaswani et al. 2017) in Flax NNX, for translation.

Architecture: a shared token embedding (one joint subword vocabulary; the encoder input, the
decoder input and the output projection all use it, as Vaswani et al. section 3.4), scaled by
sqrt(embed_dim), plus sinusoidal positions (section 3.5); pre-LayerNorm blocks (Xiong et al.
2020: stable without a long warmup), each encoder block self-attention + MLP, each decoder
block causal self-attention + cross-attention to the encoder output + MLP; final LayerNorms.

Packed sequences: several sentence pairs may share a row (`train.text.PackedPairs`). Every
token carries a segment id (0 = padding) and a position within its sentence; attention only
connects tokens of the same segment, so packed pairs never see each other, and an unpacked
padded batch is the special case segment = (token != pad), position = index.

Decoding: `init_decode` runs the encoder once and computes every decoder layer's cross-attention
keys/values once; `decode_step` then feeds one token per sequence, appending to the decoder's
self-attention KV cache. Beam search and greedy search over `decode_step` live in
`models/decoding.py`.

The residual stream is kept 2-D, `[batch * seq, embed]`, so every matmul has 2-D operands
(faster to backpropagate on XLA:CPU; free elsewhere).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

_NEG = -1e9  # masked attention score (finite: a fully masked padding row stays NaN-free)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `key` is None or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  return [None] * n if key is None else list(jax.random.split(key, n))


def sinusoidal_positions(positions: jax.Array, dim: int) -> jax.Array:
  """Vaswani et al. eq. in 3.5: [..., dim] with sin at even and cos at odd features."""
  i = jnp.arange(dim // 2, dtype=jnp.float32)
  angles = positions[..., None].astype(jnp.float32) / (10000.0 ** (2.0 * i / dim))
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
      positions.shape + (dim,))


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, causal: bool) -> jax.Array:
  """[batch, 1, q, k] bool: query and key in the same (non-padding) segment, and for
  `causal` the key not after the query."""
  mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
  if causal:
    q, k = q_segments.shape[1], k_segments.shape[1]
    mask &= jnp.tril(jnp.ones((q, k), bool))
  return mask[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, rate: float = 0.0,
           key: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention.

  Args:
    q: [batch, q, heads, head_dim]; k, v: [batch, k, heads, head_dim].
    mask: bool, broadcastable to [batch, heads, q, k]; False entries get no weight.
    rate, key: dropout on the attention probabilities.

  Returns:
    [batch, q, heads, head_dim].
  """
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', dropout(probs, rate, key), v)


class Attention(nnx.Module):
  """Multi-head attention on 2-D activations: self-attention (one fused qkv matmul) or
  cross-attention (queries from x, keys/values from a memory)."""

  def __init__(self, embed_dim: int, num_heads: int, dropout_rate: float, *, cross: bool,
               rngs: nnx.Rngs):
    if embed_dim % num_heads:
      raise ValueError(f'embed_dim={embed_dim} is not divisible by num_heads={num_heads}')
    self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
    self.rate = dropout_rate
    self.cross = cross
    if cross:
      self.q = nnx.Linear(embed_dim, embed_dim, rngs=rngs)
      self.kv = nnx.Linear(embed_dim, 2 * embed_dim, rngs=rngs)
    else:
      self.qkv = nnx.Linear(embed_dim, 3 * embed_dim, rngs=rngs)
    self.out = nnx.Linear(embed_dim, embed_dim, rngs=rngs)

  def _heads(self, x: jax.Array, batch: int, n: int) -> list[jax.Array]:
    """[batch * seq, n * embed] -> n arrays [batch, seq, heads, head_dim]."""
    x = x.reshape(batch, -1, self.num_heads, n, self.head_dim)
    return [x[:, :, :, i] for i in range(n)]

  def memory_kv(self, memory: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys and values of `memory` [batch * src, embed]."""
    return tuple(self._heads(self.kv(memory), batch, 2))

  def __call__(self, x: jax.Array, batch: int, mask: jax.Array, *,
               kv: tuple[jax.Array, jax.Array] | None = None,
               key: jax.Array | None = None) -> jax.Array:
    """x [batch * q, embed] -> [batch * q, embed]; cross-attention takes `kv` (memory_kv)."""
    if self.cross:
      (q,), (k, v) = self._heads(self.q(x), batch, 1), kv
    else:
      q, k, v = self._heads(self.qkv(x), batch, 3)
    y = attend(q, k, v, mask, self.rate, key)
    return self.out(y.reshape(x.shape[0], -1))

  def decode(self, x: jax.Array, index: jax.Array, cache: dict[str, jax.Array]
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal self-attention of one new token per row at position `index`.

    Args:
      x: [batch, embed]; index: int32 scalar; cache: {'k', 'v'} [batch, max_len, heads, hd].
    """
    q, k, v = self._heads(self.qkv(x), x.shape[0], 3)
    at = (0, index, 0, 0)
    cache = {'k': lax.dynamic_update_slice(cache['k'], k, at),
             'v': lax.dynamic_update_slice(cache['v'], v, at)}
    mask = (jnp.arange(cache['k'].shape[1]) <= index)[None, None, None, :]
    y = attend(q, cache['k'], cache['v'], mask)
    return self.out(y.reshape(x.shape[0], -1)), cache


class MLP(nnx.Module):
  def __init__(self, embed_dim: int, mlp_dim: int, dropout_rate: float, *, rngs: nnx.Rngs):
    self.fc = nnx.Linear(embed_dim, mlp_dim, rngs=rngs)
    self.proj = nnx.Linear(mlp_dim, embed_dim, rngs=rngs)
    self.rate = dropout_rate

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    return self.proj(dropout(jax.nn.relu(self.fc(x)), self.rate, key))


class Block(nnx.Module):
  """Pre-LN block: x + Drop(SelfAttn(LN x)) [+ Drop(CrossAttn(LN x, memory))] + Drop(MLP(LN x))."""

  def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int, dropout_rate: float, *,
               causal: bool, cross: bool, rngs: nnx.Rngs):
    self.rate = dropout_rate
    self.ln_self = nnx.LayerNorm(embed_dim, rngs=rngs)
    self.self_attn = Attention(embed_dim, num_heads, dropout_rate, cross=False, rngs=rngs)
    if cross:
      self.ln_cross = nnx.LayerNorm(embed_dim, rngs=rngs)
      self.cross_attn = Attention(embed_dim, num_heads, dropout_rate, cross=True, rngs=rngs)
    self.has_cross = cross
    self.ln_mlp = nnx.LayerNorm(embed_dim, rngs=rngs)
    self.mlp = MLP(embed_dim, mlp_dim, dropout_rate, rngs=rngs)

  def __call__(self, x, batch, self_mask, *, cross_kv=None, cross_mask=None, key=None):
    k = _keys(key, 7)
    x = x + dropout(self.self_attn(self.ln_self(x), batch, self_mask, key=k[0]), self.rate, k[1])
    if self.has_cross:
      y = self.cross_attn(self.ln_cross(x), batch, cross_mask, kv=cross_kv, key=k[2])
      x = x + dropout(y, self.rate, k[3])
    return x + dropout(self.mlp(self.ln_mlp(x), k[4]), self.rate, k[5])

  def decode(self, x, index, cache, cross_kv, cross_mask):
    """One token per row: x [batch, embed]; returns (x, cache)."""
    y, cache = self.self_attn.decode(self.ln_self(x), index, cache)
    x = x + y
    x = x + self.cross_attn(self.ln_cross(x), x.shape[0], cross_mask, kv=cross_kv)
    return x + self.mlp(self.ln_mlp(x)), cache


class Seq2Seq(nnx.Module):
  """Transformer encoder-decoder with a shared (tied) vocabulary embedding."""

  def __init__(self, *, vocab_size: int, num_encoder_layers: int, num_decoder_layers: int,
               num_heads: int, embed_dim: int, mlp_dim: int, dropout: float, max_len: int,
               rngs: nnx.Rngs):
    """Args:
      max_len: the longest source and target (in tokens, EOS/BOS included) it accepts.
    """
    if embed_dim % 2:
      raise ValueError(f'embed_dim={embed_dim} must be even (sinusoidal positions)')
    self.embed_dim, self.max_len, self.rate = embed_dim, max_len, dropout
    self.vocab_size = vocab_size
    self.embed = nnx.Embed(vocab_size, embed_dim,
                           embedding_init=nnx.initializers.normal(embed_dim ** -0.5), rngs=rngs)
    block = lambda **kw: Block(embed_dim, num_heads, mlp_dim, dropout, rngs=rngs, **kw)
    self.encoder = nnx.List([block(causal=False, cross=False) for _ in range(num_encoder_layers)])
    self.decoder = nnx.List([block(causal=True, cross=True) for _ in range(num_decoder_layers)])
    self.ln_encoder = nnx.LayerNorm(embed_dim, rngs=rngs)
    self.ln_decoder = nnx.LayerNorm(embed_dim, rngs=rngs)

  def _embed(self, tokens: jax.Array, positions: jax.Array, key) -> jax.Array:
    """[batch, seq] -> [batch * seq, embed]."""
    x = self.embed(tokens) * math.sqrt(self.embed_dim)
    x = x + sinusoidal_positions(positions, self.embed_dim)
    return dropout(x.reshape(-1, self.embed_dim), self.rate, key)

  def encode(self, src: jax.Array, segments: jax.Array, positions: jax.Array,
             key: jax.Array | None = None) -> jax.Array:
    """src, segments, positions [batch, src_len] int -> memory [batch * src_len, embed]."""
    batch = src.shape[0]
    keys = _keys(key, len(self.encoder) + 1)
    x = self._embed(src, positions, keys[-1])
    mask = attention_mask(segments, segments, causal=False)
    for block, k in zip(self.encoder, keys):
      x = block(x, batch, mask, key=k)
    return self.ln_encoder(x)

  def logits(self, h: jax.Array) -> jax.Array:
    """[..., embed] -> [..., vocab] float32 logits (output projection tied to the embedding)."""
    return self.embed.attend(h).astype(jnp.float32)

  def __call__(self, batch: dict[str, jax.Array], *, dropout_key: jax.Array | None = None
               ) -> jax.Array:
    """Teacher-forced logits.

    Args:
      batch: 'src', 'src_seg', 'src_pos' [b, S]; 'tgt_in', 'tgt_seg', 'tgt_pos' [b, T] (the
        decoder input: BOS then the target, per segment).
      dropout_key: None means no dropout (evaluation).

    Returns:
      [b, T, vocab] float32 logits of the next target token.
    """
    b, t = batch['tgt_in'].shape
    k_enc, k_dec, k_emb = _keys(dropout_key, 3)
    memory = self.encode(batch['src'], batch['src_seg'], batch['src_pos'], k_enc)
    x = self._embed(batch['tgt_in'], batch['tgt_pos'], k_emb)
    self_mask = attention_mask(batch['tgt_seg'], batch['tgt_seg'], causal=True)
    cross_mask = attention_mask(batch['tgt_seg'], batch['src_seg'], causal=False)
    keys = _keys(k_dec, len(self.decoder))
    for block, k in zip(self.decoder, keys):
      x = block(x, b, self_mask, cross_kv=block.cross_attn.memory_kv(memory, b),
                cross_mask=cross_mask, key=k)
    return self.logits(self.ln_decoder(x)).reshape(b, t, -1)

  # ---- incremental decoding ----
  def init_decode(self, src: jax.Array, src_valid: jax.Array, max_len: int) -> dict[str, Any]:
    """Runs the encoder once and prepares decoding.

    Args:
      src: [batch, S] int32 source ids (EOS-terminated, padded); src_valid: [batch, S] bool.
      max_len: decoder steps the self-attention cache holds (<= self.max_len).

    Returns:
      {'cache': per-layer {'k', 'v'} [batch, max_len, heads, head_dim] zeros (what beam search
       reorders), 'cross': per-layer (k, v) [batch, S, heads, head_dim] and 'cross_mask'
       [batch, 1, 1, S] (fixed for the whole search)}.
    """
    if max_len > self.max_len:
      raise ValueError(f'max_len={max_len} exceeds the model max_len={self.max_len}')
    batch, s = src.shape
    segments = src_valid.astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(s), (batch, s))
    memory = self.encode(src, segments, positions)
    heads, hd = self.decoder[0].self_attn.num_heads, self.decoder[0].self_attn.head_dim
    zeros = jnp.zeros((batch, max_len, heads, hd), memory.dtype)
    return {'cache': [{'k': zeros, 'v': zeros} for _ in self.decoder],
            'cross': [block.cross_attn.memory_kv(memory, batch) for block in self.decoder],
            'cross_mask': src_valid[:, None, None, :]}

  def decode_step(self, tokens: jax.Array, index: jax.Array, cache, cross, cross_mask
                  ) -> tuple[jax.Array, Any]:
    """Next-token logits [batch, vocab] float32 after feeding `tokens` [batch] at decoder
    position `index` (0 for BOS); returns them with the updated cache."""
    x = self.embed(tokens) * math.sqrt(self.embed_dim)
    x = x + sinusoidal_positions(jnp.full(tokens.shape, index), self.embed_dim)
    new_cache = []
    for block, layer_cache, kv in zip(self.decoder, cache, cross):
      x, layer_cache = block.decode(x, index, layer_cache, kv, cross_mask)
      new_cache.append(layer_cache)
    return self.logits(self.ln_decoder(x)), new_cache


def num_params(model: nnx.Module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
