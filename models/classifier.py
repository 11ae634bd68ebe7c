"""A small CNN image classifier: the feature extractor of image evaluation (train/evaluate.py).

conv3x3(32) -> ReLU -> maxpool2 -> conv3x3(64) -> ReLU -> maxpool2 -> dense(128) -> ReLU
-> dropout -> dense(num_classes). `features` are the 128 penultimate activations (after ReLU,
before dropout): the space where Frechet distance and precision/recall are measured.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers


class Classifier(nnx.Module):
  """CNN over [batch, H, W, C] float images in [-1, 1]; H and W divisible by 4."""

  def __init__(self, *, image_shape: tuple[int, int, int], num_classes: int,
               channels: tuple[int, int] = (32, 64), hidden: int = 128, dropout: float = 0.5,
               dtype=jnp.float32, rngs: nnx.Rngs, dropout_bits: int = 32):
    """`dtype`: activations (bfloat16 for mixed precision); params stay float32.
    `dropout_bits`: random bits per dropout mask element (`layers.dropout`; 32: bernoulli)."""
    h, w, c = image_shape
    if h % 4 or w % 4:
      raise ValueError(f'Classifier needs H and W divisible by 4, got {image_shape}')
    self.image_shape = tuple(image_shape)
    self.dropout, self.dropout_bits = dropout, layers.check_dropout_bits(dropout_bits)
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.conv1 = nnx.Conv(c, channels[0], (3, 3), padding='SAME', **kw)
    self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), padding='SAME', **kw)
    self.fc = nnx.Linear((h // 4) * (w // 4) * channels[1], hidden, **kw)
    self.head = nnx.Linear(hidden, num_classes, **kw)

  def features(self, x: jax.Array) -> jax.Array:
    """[batch, H, W, C] images in [-1, 1] -> [batch, hidden] penultimate activations."""
    x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
    return jax.nn.relu(self.fc(x.reshape(x.shape[0], -1))).astype(jnp.float32)

  def logits_from_features(self, feats: jax.Array, dropout_key: jax.Array | None = None
                           ) -> jax.Array:
    """[batch, hidden] features -> [batch, num_classes] logits (inverted dropout with a key)."""
    feats = layers.dropout(feats, self.dropout, dropout_key, self.dropout_bits)
    return self.head(feats).astype(jnp.float32)

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """[batch, H, W, C] images in [-1, 1] -> [batch, num_classes] logits."""
    return self.logits_from_features(self.features(x), dropout_key)
