"""Encoder-decoder transformer (Vaswani et al. 2017) in Flax NNX, for translation.

Architecture: a shared token embedding (one joint subword vocabulary; the encoder input, the
decoder input and the output projection all use it, as Vaswani et al. section 3.4), scaled by
sqrt(embed_dim), plus sinusoidal positions (section 3.5); the blocks are `models.layers.Block`,
the same pre-LayerNorm blocks as GPT and BERT (Xiong et al. 2020: pre-LN trains stably without a
long warmup): each encoder block self-attention + MLP, each decoder block causal self-attention
+ cross-attention to the encoder output + MLP; final LayerNorms. Dropout: on the embeddings,
the attention probabilities and every residual branch.

Init: normal(1 / sqrt(embed_dim)) for the embedding and the projections into a block, that
divided by sqrt(2 * layers) for the projections back into the residual stream (GPT-2's scaling,
per stack), zero biases.

Packed sequences: several sentence pairs may share a row (`train.text.PackedPairs`). Every
token carries a segment id (0 = padding) and a position within its sentence; attention only
connects tokens of the same segment, so packed pairs never see each other, and an unpacked
padded batch is the special case segment = (token != pad), position = index.

Decoding: `init_decode` runs the encoder once and computes every decoder layer's cross-attention
keys/values once; `decode_step` then feeds one token per sequence, appending to the decoder's
self-attention KV cache. Beam search and greedy search over `decode_step` live in
`models/decoding.py`.

The residual stream is kept 2-D, `[batch * seq, embed]` (see models/layers.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  return [None] * n if key is None else list(jax.random.split(key, n))


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, causal: bool) -> jax.Array:
  """[batch, 1, q, k] bool: query and key in the same (non-padding) segment, and for
  `causal` the key not after the query."""
  mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
  if causal:
    q, k = q_segments.shape[1], k_segments.shape[1]
    mask &= jnp.tril(jnp.ones((q, k), bool))
  return mask[:, None]


class Seq2Seq(nnx.Module):
  """Transformer encoder-decoder with a shared (tied) vocabulary embedding.

  Params: embed `[vocab, D]`, encoder/i and decoder/i (`layers.Block`; the decoder's with
  cross_attn), ln_encoder, ln_decoder.
  """

  def __init__(self, *, vocab_size: int, num_encoder_layers: int, num_decoder_layers: int,
               num_heads: int, embed_dim: int, mlp_dim: int, dropout: float, max_len: int,
               attention_implementation: str | None = None, rngs: nnx.Rngs,
               dropout_bits: int = 32):
    """Args:
      max_len: the longest source and target (in tokens, EOS/BOS included) it accepts.
      attention_implementation: see `layers.attention_implementation`.
      dropout_bits: random bits per dropout mask element (`layers.dropout`; 32: bernoulli).
    """
    if embed_dim % 2:
      raise ValueError(f'embed_dim={embed_dim} must be even (sinusoidal positions)')
    if embed_dim % num_heads:
      raise ValueError(f'embed_dim={embed_dim} is not divisible by num_heads={num_heads}')
    self.embed_dim, self.max_len, self.rate = embed_dim, max_len, dropout
    self.dropout_bits = dropout_bits
    self.vocab_size = vocab_size
    std = embed_dim ** -0.5
    self.embed = nnx.Embed(vocab_size, embed_dim,
                           embedding_init=nnx.initializers.normal(std), rngs=rngs)

    def stack(n: int, cross: bool) -> nnx.List:
      return nnx.List([
          layers.Block(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout,
                       init_std=std, out_init_std=std / math.sqrt(2 * n),
                       cross_attention=cross, mlp_dim=mlp_dim,
                       implementation=attention_implementation, rngs=rngs,
                       dropout_bits=dropout_bits)
          for _ in range(n)])
    self.encoder = stack(num_encoder_layers, cross=False)
    self.decoder = stack(num_decoder_layers, cross=True)
    self.ln_encoder = nnx.LayerNorm(embed_dim, epsilon=1e-5, rngs=rngs)
    self.ln_decoder = nnx.LayerNorm(embed_dim, epsilon=1e-5, rngs=rngs)

  def _embed(self, tokens: jax.Array, positions: jax.Array, key) -> jax.Array:
    """[batch, seq] -> [batch * seq, embed]."""
    x = self.embed(tokens) * math.sqrt(self.embed_dim)
    x = x + layers.sinusoidal_positions(positions, self.embed_dim)
    return layers.dropout(x.reshape(-1, self.embed_dim), self.rate, key, self.dropout_bits)

  def encode(self, src: jax.Array, segments: jax.Array, positions: jax.Array,
             key: jax.Array | None = None) -> jax.Array:
    """src, segments, positions [batch, src_len] int -> memory [batch * src_len, embed]."""
    batch, seq = src.shape
    keys = _keys(key, len(self.encoder) + 1)
    x = self._embed(src, positions, keys[-1])
    mask = attention_mask(segments, segments, causal=False)
    for block, k in zip(self.encoder, keys):
      x = block(x, batch=batch, seq=seq, mask=mask, dropout_key=k)
    return self.ln_encoder(x)

  def logits(self, h: jax.Array) -> jax.Array:
    """[n, embed] -> [n, vocab] float32 logits (output projection tied to the embedding)."""
    return layers.tied_logits(h, self.embed)

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
    s = batch['src'].shape[1]
    k_enc, k_dec, k_emb = _keys(dropout_key, 3)
    memory = self.encode(batch['src'], batch['src_seg'], batch['src_pos'], k_enc)
    x = self._embed(batch['tgt_in'], batch['tgt_pos'], k_emb)
    self_mask = attention_mask(batch['tgt_seg'], batch['tgt_seg'], causal=True)
    cross_mask = attention_mask(batch['tgt_seg'], batch['src_seg'], causal=False)
    for block, k in zip(self.decoder, _keys(k_dec, len(self.decoder))):
      x = block(x, batch=b, seq=t, mask=self_mask,
                context_kv=block.context_kv(memory, batch=b, seq=s), context_mask=cross_mask,
                dropout_key=k)
    return self.logits(self.ln_decoder(x)).reshape(b, t, -1)

  # ---- incremental decoding ----
  def init_decode(self, src: jax.Array, src_valid: jax.Array, max_len: int) -> dict[str, Any]:
    """Runs the encoder once and prepares decoding.

    Args:
      src: [batch, S] int32 source ids (EOS-terminated, padded); src_valid: [batch, S] bool.
      max_len: decoder steps the self-attention cache holds (<= self.max_len).

    Returns:
      {'cache': per-layer {'k', 'v'} [batch, max_len, heads, head_dim] zeros (what beam search
       reorders), 'cross': per-layer {'k', 'v'} [batch, S, heads, head_dim] and 'cross_mask'
       [batch, 1, 1, S] (fixed for the whole search)}.
    """
    if max_len > self.max_len:
      raise ValueError(f'max_len={max_len} exceeds the model max_len={self.max_len}')
    batch, s = src.shape
    segments = src_valid.astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(s), (batch, s))
    memory = self.encode(src, segments, positions)
    attn = self.decoder[0].attn
    cache = [layers.init_kv_cache(batch, max_len, attn.num_heads, attn.head_dim, memory.dtype)
             for _ in self.decoder]
    return {'cache': cache,
            'cross': [block.context_kv(memory, batch=batch, seq=s) for block in self.decoder],
            'cross_mask': layers.padding_mask(src_valid)}

  def decode_step(self, tokens: jax.Array, index: jax.Array, cache, cross, cross_mask
                  ) -> tuple[jax.Array, Any]:
    """Next-token logits [batch, vocab] float32 after feeding `tokens` [batch] at decoder
    position `index` (0 for BOS); returns them with the updated cache."""
    x = self.embed(tokens) * math.sqrt(self.embed_dim)
    x = x + layers.sinusoidal_positions(jnp.full(tokens.shape, index), self.embed_dim)
    new_cache = []
    for block, layer_cache, kv in zip(self.decoder, cache, cross):
      x, layer_cache = block.decode(x, index, layer_cache, context_kv=kv,
                                    context_mask=cross_mask)
      new_cache.append(layer_cache)
    return self.logits(self.ln_decoder(x)), new_cache


def num_params(model: nnx.Module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
