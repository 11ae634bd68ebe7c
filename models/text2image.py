"""A caption-conditioned denoiser: a transformer text encoder read by a cross-attention UNet.

The text encoder is BERT's encoder (models/bert.py) without its MLM head: token + learned
position embeddings, pre-LayerNorm `models.layers.Block`s of bidirectional self-attention under
a padding mask, a final LayerNorm; its params (`embed`, `blocks`, `ln_f`) have BERT's paths.
Its token outputs [B, L, D] and the padding mask are the UNet's context (models/unet.py).

Classifier-free guidance (Ho & Salimans 2022) needs a null caption: the text2image family uses
a caption of one [NULL] token (train/captions.py `null_tokens`), which the encoder reads like
any other. A row of padding only would give the UNet no text at all (see models/unet.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from models import unet as unet_lib


class TextEncoder(nnx.Module):
  """tokens [B, L] (padded with pad_id) -> token vectors [B, L, embed_dim]."""

  def __init__(self, *, vocab_size: int, max_len: int, num_layers: int, num_heads: int,
               embed_dim: int, dropout: float = 0.0, pad_id: int = 0,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if embed_dim % num_heads:
      raise ValueError(f'embed_dim {embed_dim} not divisible by num_heads {num_heads}')
    self.num_layers, self.dropout, self.pad_id = num_layers, dropout, pad_id
    init_std = embed_dim ** -0.5   # as models/bert.py
    self.embed = layers.Embeddings(vocab_size=vocab_size, max_len=max_len, embed_dim=embed_dim,
                                   init_std=init_std, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([
        layers.Block(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout,
                     init_std=init_std, out_init_std=init_std / math.sqrt(2 * num_layers),
                     dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(embed_dim, epsilon=1e-5, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    batch, seq = tokens.shape
    keys = ([None] * (self.num_layers + 1) if dropout_key is None
            else list(jax.random.split(dropout_key, self.num_layers + 1)))
    mask = layers.padding_mask(tokens != self.pad_id)   # [B, 1, 1, L]
    x = layers.dropout(self.embed(tokens), self.dropout, keys[0])   # [B * L, D]
    for block, key in zip(self.blocks, keys[1:]):
      x = block(x, batch=batch, seq=seq, mask=mask, dropout_key=key)
    return self.ln_f(x).reshape(batch, seq, -1)


class TextToImageUNet(nnx.Module):
  """(x_t [B, H, W, C], t [B], tokens [B, L]) -> [B, H, W, C] float32: the UNet conditioned on
  the text encoder's reading of the tokens (trained jointly).

  Args:
    text: TextEncoder keyword arguments (vocab_size, max_len, num_layers, num_heads,
      embed_dim, dropout, pad_id).
    unet: UNet keyword arguments (image_shape, channels, ...; not context_dim, which is the
      encoder's embed_dim).
  """

  def __init__(self, *, text: dict[str, Any], unet: dict[str, Any], dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.pad_id = int(text.get('pad_id', 0))
    self.text = TextEncoder(**text, dtype=dtype, rngs=rngs)
    self.unet = unet_lib.UNet(**unet, context_dim=text['embed_dim'], dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, tokens: jax.Array, *,
               dropout_key: jax.Array | None = None) -> jax.Array:
    text_key = unet_key = None
    if dropout_key is not None:
      text_key, unet_key = jax.random.split(dropout_key)
    valid = tokens != self.pad_id   # [B, L]
    context = self.text(tokens, dropout_key=text_key)
    return self.unet(x, t, context=context, context_mask=valid, dropout_key=unet_key)
