"""A caption-conditioned denoiser: a transformer text encoder read by a cross-attention UNet.

The text encoder is `models.bert.Encoder`, BERT's encoder without its MLM head: token + learned
position embeddings, pre-LayerNorm `models.layers.Block`s of bidirectional self-attention under
a padding mask, a final LayerNorm; its params (`embed`, `blocks`, `ln_f`) have BERT's paths.
Its token outputs [B, L, D] and the padding mask are the UNet's context (models/unet.py).

Classifier-free guidance (Ho & Salimans 2022) needs a null caption: the text2image family uses
a caption of one [NULL] token (train/captions.py `null_tokens`), which the encoder reads like
any other. A row of padding only would give the UNet no text at all (see models/unet.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import bert as bert_lib
from models import unet as unet_lib


class TextToImageUNet(nnx.Module):
  """(x_t [B, H, W, C], t [B], tokens [B, L]) -> [B, H, W, C] float32: the UNet conditioned on
  the text encoder's reading of the tokens (trained jointly).

  Args:
    text: `models.bert.Encoder` keyword arguments (vocab_size, max_len, num_layers, num_heads,
      embed_dim, dropout, pad_id, dropout_bits).
    unet: UNet keyword arguments (image_shape, channels, ...; not context_dim, which is the
      encoder's embed_dim).
  """

  def __init__(self, *, text: dict[str, Any], unet: dict[str, Any], dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.pad_id = int(text.get('pad_id', 0))
    self.text = bert_lib.Encoder(**text, dtype=dtype, rngs=rngs)
    self.unet = unet_lib.UNet(**unet, context_dim=text['embed_dim'], dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, tokens: jax.Array, *,
               dropout_key: jax.Array | None = None) -> jax.Array:
    text_key = unet_key = None
    if dropout_key is not None:
      text_key, unet_key = jax.random.split(dropout_key)
    valid = tokens != self.pad_id   # [B, L]
    context = self.text.hidden(tokens, dropout_key=text_key)   # [B, L, D]
    return self.unet(x, t, context=context, context_mask=valid, dropout_key=unet_key)
