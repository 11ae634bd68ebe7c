"""DCGAN-style generator and discriminator (Radford et al. 2016) for small images, and GAN losses.

Generator: z [batch, z_dim] -> dense -> [H/4, W/4, 2c] -> ReLU -> 2x sub-pixel upsampling conv
(c) -> ReLU -> 2x sub-pixel upsampling conv (C) -> tanh: images [batch, H, W, C] in [-1, 1]
(models/upsample.py: DCGAN's transposed convolutions, but fast to differentiate on CPU).
Discriminator: two 4x4 stride-2 convs (c, 2c) with LeakyReLU(0.2) -> dense -> a logit [batch].
No batch norm: it would couple the examples of a batch and leave running statistics beside the
EMA weights; the R1 penalty (Mescheder et al. 2018) stabilises training instead.
Class-conditional: the generator concatenates a label embedding to z; the discriminator adds the
projection term <embed(y), features> (Miyato & Koyama 2018).
Latent codes (InfoGAN, Chen et al. 2016): an unconditional generator can take a categorical code
c in [0, codes) the same way (an embedding concatenated to z), and the discriminator then has a
second head, Q: logits over the codes from the same features, with which training maximises a
lower bound on the mutual information between c and G(z, c) (`info_loss`). No labels are used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.upsample import UpConv

LOSSES = ('non_saturating', 'hinge')
NORMS = ('none', 'pixel')


def pixel_norm(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Each position's feature vector scaled to unit RMS (Karras et al. 2018, section 4.2): a
  per-example normalisation, so no batch coupling and no running statistics beside EMA weights."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class Generator(nnx.Module):
  """`refine`: extra 3x3 convs (ReLU) at the H/4 and H/2 resolutions (depth where it is cheap);
  `norm`: 'none' or 'pixel' (pixel norm after every hidden ReLU); `num_classes`: the class labels
  of a conditional generator, or the number of InfoGAN codes (the generator treats both alike)."""

  def __init__(self, *, image_shape: tuple[int, int, int], z_dim: int = 64, channels: int = 32,
               num_classes: int = 0, refine: int = 0, norm: str = 'none', dtype=jnp.float32,
               rngs: nnx.Rngs):
    """`dtype`: activations (bfloat16 for mixed precision); params stay float32."""
    h, w, c = image_shape
    if h % 4 or w % 4:
      raise ValueError(f'the DCGAN generator needs H and W divisible by 4, got {image_shape}')
    if norm not in NORMS:
      raise ValueError(f'generator norm={norm!r}: use one of {NORMS}')
    self.z_dim = z_dim
    self.num_classes = num_classes
    self.norm = norm
    self.start = (h // 4, w // 4, 2 * channels)
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.embed = nnx.Embed(num_classes, z_dim, **kw) if num_classes else None
    in_dim = 2 * z_dim if num_classes else z_dim
    self.fc = nnx.Linear(in_dim, h // 4 * w // 4 * 2 * channels, **kw)
    conv = lambda n: nnx.Conv(n, n, (3, 3), **kw)
    self.refine1 = nnx.List([conv(2 * channels) for _ in range(refine)])
    self.up1 = UpConv(2 * channels, channels, dtype=dtype, rngs=rngs)
    self.refine2 = nnx.List([conv(channels) for _ in range(refine)])
    self.up2 = UpConv(channels, c, dtype=dtype, rngs=rngs)

  def _act(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(x)
    return pixel_norm(x) if self.norm == 'pixel' else x

  def __call__(self, z: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """z [batch, z_dim] (labels [batch] int when conditional) -> [batch, H, W, C] in [-1, 1]."""
    if self.embed is not None:
      z = jnp.concatenate([z, self.embed(labels).astype(z.dtype)], axis=-1)
    x = self._act(self.fc(z)).reshape((z.shape[0],) + self.start)   # [batch, H/4, W/4, 2c]
    for layer in self.refine1:
      x = self._act(layer(x))
    x = self._act(self.up1(x))                                         # [batch, H/2, W/2, c]
    for layer in self.refine2:
      x = self._act(layer(x))
    return jnp.tanh(self.up2(x)).astype(jnp.float32)


class Discriminator(nnx.Module):
  """`refine`: extra 3x3 convs (2c, LeakyReLU) at the H/4 resolution before the dense layer."""

  def __init__(self, *, image_shape: tuple[int, int, int], channels: int = 32,
               num_classes: int = 0, refine: int = 0, codes: int = 0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    """`codes` > 0: InfoGAN's Q head, logits over that many latent codes (`with_code_logits`)."""
    h, w, c = image_shape
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.conv1 = nnx.Conv(c, channels, (4, 4), strides=2, **kw)
    self.conv2 = nnx.Conv(channels, 2 * channels, (4, 4), strides=2, **kw)
    self.refine = nnx.List([nnx.Conv(2 * channels, 2 * channels, (3, 3), **kw)
                            for _ in range(refine)])
    features = -(-h // 4) * -(-w // 4) * 2 * channels
    self.fc = nnx.Linear(features, 1, **kw)
    self.embed = nnx.Embed(num_classes, features, **kw) if num_classes else None
    self.q = nnx.Linear(features, codes, **kw) if codes else None

  def _features(self, x: jax.Array) -> jax.Array:
    h = jax.nn.leaky_relu(self.conv1(x), 0.2)
    h = jax.nn.leaky_relu(self.conv2(h), 0.2)
    for layer in self.refine:
      h = jax.nn.leaky_relu(layer(h), 0.2)
    return h.reshape(x.shape[0], -1)

  def _logits(self, h: jax.Array, labels: jax.Array | None) -> jax.Array:
    logits = self.fc(h)[:, 0].astype(jnp.float32)
    if self.embed is not None:
      logits += jnp.sum(self.embed(labels) * h, axis=-1, dtype=jnp.float32)
    return logits

  def __call__(self, x: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """[batch, H, W, C] images in [-1, 1] -> [batch] logits (high: real)."""
    return self._logits(self._features(x), labels)

  def with_code_logits(self, x: jax.Array,
                       labels: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(the [batch] real/fake logits of `__call__`, Q's [batch, codes] code logits), from one
    pass through the shared features."""
    if self.q is None:
      raise ValueError('this discriminator has no Q head (codes=0)')
    h = self._features(x)
    return self._logits(h, labels), self.q(h).astype(jnp.float32)


def discriminator_loss(kind: str, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """'non_saturating': -log D(x) - log(1 - D(G(z))) (Goodfellow et al. 2014), D = sigmoid(logit);
  'hinge': max(0, 1 - D(x)) + max(0, 1 + D(G(z))) (Lim & Ye 2017). Means over the batch."""
  if kind == 'non_saturating':
    return (optax.sigmoid_binary_cross_entropy(real_logits, 1.0).mean()
            + optax.sigmoid_binary_cross_entropy(fake_logits, 0.0).mean())
  if kind == 'hinge':
    return optax.hinge_loss(real_logits, 1.0).mean() + optax.hinge_loss(fake_logits, -1.0).mean()
  raise ValueError(f'unknown GAN loss {kind!r} (known: {LOSSES})')


def generator_loss(kind: str, fake_logits: jax.Array) -> jax.Array:
  """'non_saturating': -log D(G(z)); 'hinge': -D(G(z)) (logit). Means over the batch."""
  if kind == 'non_saturating':
    return optax.sigmoid_binary_cross_entropy(fake_logits, 1.0).mean()
  if kind == 'hinge':
    return -fake_logits.mean()
  raise ValueError(f'unknown GAN loss {kind!r} (known: {LOSSES})')


def info_loss(code_logits: jax.Array, codes: jax.Array) -> jax.Array:
  """InfoGAN's L_I for a uniform categorical code (Chen et al. 2016, eq. 5) as a loss: the mean
  cross-entropy -log Q(c | G(z, c)). log(codes) minus it is the lower bound on the mutual
  information I(c; G(z, c)) (H(c) = log(codes)), which reaches its maximum, log(codes), when the
  loss is 0."""
  return optax.softmax_cross_entropy_with_integer_labels(code_logits, codes).mean()


def r1_penalty(discriminator, real: jax.Array, labels: jax.Array | None = None) -> jax.Array:
  """||grad_x D(x)||^2 at real images, [batch] (Mescheder et al. 2018, eq. 9 without gamma/2)."""
  grads = jax.grad(lambda x: discriminator(x, labels).sum())(real)
  return jnp.sum(jnp.square(grads).reshape(real.shape[0], -1), axis=-1)
