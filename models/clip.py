"""A contrastive text-image model (CLIP, Radford et al. 2021) for small grey images, in Flax NNX.

Image encoder: `models.classifier.Classifier`'s CNN (conv3x3-pool-conv3x3-pool-dense), its
output layer used as the projection into the shared space. A small CNN rather than a ViT: on
28x28 images and a few thousand CPU steps it learns fast, and what the captions describe
(stroke width, slant, brightness, texture) is local shape that convolutions see directly; the
dense layer after the convolutions keeps where things are.

Text encoder (`TextEncoder`: `models.bert.Encoder`, BERT's encoder without its head): token +
position embeddings and pre-LayerNorm bidirectional transformer blocks (`models.layers`), a
padding mask, a final LayerNorm, then the mean over the real tokens
(`models.retriever.mean_pool`) and a linear projection.

Both embeddings are normalised to unit length; the logits are cosine * exp(log_scale), with
log_scale learned, initialised to log(1 / 0.07) and clipped to [0, log 100] as CLIP does (here
inside the forward pass, so the clipped value also gets no gradient). The loss is CLIP's
symmetric InfoNCE: the mean of the image->text and text->image softmax cross-entropies over the
batch, the matching pair the target (`symmetric_info_nce`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import bert as bert_lib
from models import classifier as classifier_lib
from models import retriever as retriever_lib

INIT_LOG_SCALE = math.log(1 / 0.07)
MAX_LOG_SCALE = math.log(100.0)


def normalise(x: jax.Array) -> jax.Array:
  """[batch, dim] -> float32 rows of unit length."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


class TextEncoder(bert_lib.Encoder):
  """tokens `[batch, seq]` (padded with pad_id) -> `[batch, D]`: the transformer encoder of
  models/bert.py (params embed, blocks/i, ln_f), mean-pooled over the real tokens."""

  def __call__(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """`[batch, D]` float32 mean of the hidden states over the real (non-pad) tokens."""
    return retriever_lib.mean_pool(self.hidden(tokens, dropout_key=dropout_key),
                                   tokens != self.pad_id)


class CLIP(nnx.Module):
  """Image and text encoders into one `proj_dim`-wide space, and the learned logit scale.

  Params: image (the CNN; its `head` is the image projection), text (`TextEncoder`),
  text_proj, log_scale.
  """

  def __init__(self, *, image_shape: tuple[int, int, int], vocab_size: int, max_len: int,
               proj_dim: int, channels: tuple[int, int], hidden: int, num_layers: int,
               num_heads: int, embed_dim: int, dropout: float = 0.0, pad_id: int = 0,
               attention_implementation: str | None = None, dtype: Any = jnp.float32,
               rngs: nnx.Rngs, dropout_bits: int = 32):
    self.image = classifier_lib.Classifier(
        image_shape=image_shape, num_classes=proj_dim, channels=channels, hidden=hidden,
        dropout=dropout, dropout_bits=dropout_bits, dtype=dtype, rngs=rngs)
    self.text = TextEncoder(vocab_size=vocab_size, max_len=max_len, num_layers=num_layers,
                            num_heads=num_heads, embed_dim=embed_dim, dropout=dropout,
                            pad_id=pad_id, attention_implementation=attention_implementation,
                            dropout_bits=dropout_bits, dtype=dtype, rngs=rngs)
    self.text_proj = nnx.Linear(embed_dim, proj_dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.log_scale = nnx.Param(jnp.asarray(INIT_LOG_SCALE, jnp.float32))

  def embed_images(self, images: jax.Array, *, dropout_key: jax.Array | None = None
                   ) -> jax.Array:
    """float images `[batch, H, W, C]` in [-1, 1] -> unit-length `[batch, proj_dim]`."""
    return normalise(self.image(images, dropout_key=dropout_key))

  def embed_texts(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None
                  ) -> jax.Array:
    """tokens `[batch, seq]` -> unit-length `[batch, proj_dim]`."""
    return normalise(self.text_proj(self.text(tokens, dropout_key=dropout_key)))

  def scale(self) -> jax.Array:
    """exp(log_scale clipped to [0, log 100]): the inverse softmax temperature."""
    return jnp.exp(jnp.clip(self.log_scale[...], 0.0, MAX_LOG_SCALE))


def symmetric_info_nce(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CLIP's loss on unit-length `[batch, dim]` embeddings, row i of each the matching pair.

  Returns (mean of the image->text and text->image cross-entropies, {'image_to_text_accuracy',
  'text_to_image_accuracy'}: share of rows whose own pair scores highest in the batch). With
  identical embeddings in every row it is log(batch).
  """
  temperature = 1.0 / scale
  i2t, i2t_acc = retriever_lib.in_batch_contrastive_loss(image_emb, text_emb, temperature)
  t2i, t2i_acc = retriever_lib.in_batch_contrastive_loss(text_emb, image_emb, temperature)
  return (i2t + t2i) / 2, {'image_to_text_accuracy': i2t_acc, 'text_to_image_accuracy': t2i_acc}
