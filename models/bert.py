"""Encoder-only transformer (BERT, Devlin et al. 2019) for masked language modelling, in Flax NNX.

Architecture: token + learned position embeddings, dropout, pre-LayerNorm blocks of
bidirectional self-attention (a padding mask, no causal mask) and a 4x GELU MLP, final LayerNorm
(the pre-LN arrangement of GPT-2 rather than BERT's post-LN, so the blocks are the same
`models.layers.Block` as GPT's); the MLM head is BERT's: dense + GELU + LayerNorm, then the
output projection tied to the token embedding plus a per-token output bias.

Only the masked positions go through the head (`positions`, as BERT's `masked_lm_positions`):
the vocab-sized matmul then costs ~15% of what it would over every position.

Init: normal(std) weights and embeddings, normal(std / sqrt(2 * num_layers)) for the residual
projections, zero biases, as models/gpt.py; std defaults to 1 / sqrt(embed_dim).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers


class Encoder(nnx.Module):
  """The bidirectional transformer encoder without a head: tokens `[batch, seq]` (padded with
  pad_id) -> hidden states. BERT adds its MLM head; the text encoders of the contrastive and
  text-to-image models (models/clip.py, models/text2image.py) read its hidden states.

  Params: embed (wte `[vocab, D]`, wpe `[max_len, D]`), blocks/i (`layers.Block`), ln_f.
  """

  def __init__(self, *, vocab_size: int, max_len: int, num_layers: int, num_heads: int,
               embed_dim: int, dropout: float = 0.0, init_std: float | None = None,
               pad_id: int = 0, attention_implementation: str | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
               dropout_bits: int = 32):
    """pad_id: the padding token; positions holding it are masked out as keys.
    dropout_bits: random bits per dropout mask element (`layers.dropout`; 32: bernoulli)."""
    if embed_dim % num_heads:
      raise ValueError(f'embed_dim {embed_dim} not divisible by num_heads {num_heads}')
    self.vocab_size = vocab_size
    self.max_len = max_len
    self.num_layers = num_layers
    self.embed_dim = embed_dim
    self.dropout, self.dropout_bits = dropout, dropout_bits
    self.pad_id = pad_id
    self.init_std = embed_dim ** -0.5 if init_std is None else init_std
    self.embed = layers.Embeddings(vocab_size=vocab_size, max_len=max_len, embed_dim=embed_dim,
                                   init_std=self.init_std, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
    self.blocks = nnx.List([
        layers.Block(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout,
                     init_std=self.init_std,
                     out_init_std=self.init_std / math.sqrt(2 * num_layers),
                     implementation=attention_implementation, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs, dropout_bits=dropout_bits)
        for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(embed_dim, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)

  def encode(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """tokens `[batch, seq]` (padded with pad_id) -> hidden states `[batch * seq, embed]`.

    Every real position attends to every real position (both directions); padding positions
    are never attended to, so their content does not change any real position's output.
    """
    batch, seq = tokens.shape
    keys = ([None] * (self.num_layers + 1) if dropout_key is None
            else list(jax.random.split(dropout_key, self.num_layers + 1)))
    mask = layers.padding_mask(tokens != self.pad_id)  # [batch, 1, 1, seq]
    x = layers.dropout(self.embed(tokens), self.dropout, keys[0], self.dropout_bits)
    for block, key in zip(self.blocks, keys[1:]):
      x = block(x, batch=batch, seq=seq, mask=mask, dropout_key=key)
    return self.ln_f(x)

  def hidden(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """`encode` as `[batch, seq, embed]`."""
    return self.encode(tokens, dropout_key=dropout_key).reshape(*tokens.shape, self.embed_dim)


class BERT(Encoder):
  """Bidirectional encoder with a tied MLM head.

  Params: the `Encoder`'s (embed, blocks/i, ln_f), head_dense, head_ln, head_bias `[vocab]`.
  """

  def __init__(self, *, vocab_size: int, max_len: int, num_layers: int, num_heads: int,
               embed_dim: int, dropout: float = 0.0, init_std: float | None = None,
               pad_id: int = 0, attention_implementation: str | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
               dropout_bits: int = 32):
    super().__init__(vocab_size=vocab_size, max_len=max_len, num_layers=num_layers,
                     num_heads=num_heads, embed_dim=embed_dim, dropout=dropout,
                     init_std=init_std, pad_id=pad_id,
                     attention_implementation=attention_implementation, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs, dropout_bits=dropout_bits)
    self.head_dense = nnx.Linear(embed_dim, embed_dim,
                                 kernel_init=nnx.initializers.normal(self.init_std),
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head_ln = nnx.LayerNorm(embed_dim, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.head_bias = nnx.Param(jnp.zeros((vocab_size,), param_dtype))

  def mlm_logits(self, tokens: jax.Array, positions: jax.Array, *,
                 dropout_key: jax.Array | None = None) -> jax.Array:
    """Float32 logits `[batch, num_positions, vocab]` at `positions` `[batch, num_positions]`
    (int32 indices into seq) of tokens `[batch, seq]`."""
    batch, seq = tokens.shape
    h = self.encode(tokens, dropout_key=dropout_key).reshape(batch, seq, self.embed_dim)
    h = jnp.take_along_axis(h, positions[..., None], axis=1)  # [batch, P, embed]
    h = h.reshape(-1, self.embed_dim)
    h = self.head_ln(layers.gelu(self.head_dense(h)))
    logits = self.embed.logits(h) + self.head_bias[...].astype(jnp.float32)
    return logits.reshape(batch, positions.shape[1], self.vocab_size)

  def __call__(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """MLM logits at every position: tokens `[batch, seq]` -> float32 `[batch, seq, vocab]`."""
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return self.mlm_logits(tokens, positions, dropout_key=dropout_key)
