"""Variational autoencoders (Kingma & Welling 2014) and the importance-weighted bound (Burda et al. 2016).

A `VAE` has an encoder q(z|x) = N(mean, diag(exp(log_var))), a standard normal prior p(z) and a
decoder p(x|z) that is either Bernoulli (binary pixels; the decoder outputs logits) or Gaussian
(continuous pixels in [-1, 1]; the decoder outputs means, with a learned or fixed per-pixel log
standard deviation). Encoder and decoder are MLPs (Burda et al.'s 784-200-200-50 setup) or small
convolutional nets. Class-conditional variants concatenate a one-hot label to the encoder's and
the decoder's inputs.

Shapes: images x [batch, H, W, C]; latents z [..., batch, latent_dim]; per-example terms [batch].
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.upsample import UpConv

LIKELIHOODS = ('bernoulli', 'gaussian')
ARCHITECTURES = ('mlp', 'conv')
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'tanh': jnp.tanh, 'relu': jax.nn.relu, 'softplus': jax.nn.softplus, 'gelu': jax.nn.gelu}


# ---------------------------------------------------------------------------------------------
# Distributions.
# ---------------------------------------------------------------------------------------------
def reparameterize(mean: jax.Array, log_var: jax.Array, key: jax.Array,
                   num: int | None = None) -> jax.Array:
  """z = mean + exp(log_var / 2) * eps, eps ~ N(0, I): [batch, L], or [num, batch, L] with `num`."""
  shape = mean.shape if num is None else (num,) + mean.shape
  eps = jax.random.normal(key, shape, mean.dtype)
  return mean + jnp.exp(0.5 * log_var) * eps


def gaussian_kl(mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """KL(N(mean, diag(exp(log_var))) || N(0, I)) in nats, [batch] (Kingma & Welling, App. B)."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - log_var - 1.0, axis=-1)


def diag_gaussian_log_prob(z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """log N(z; mean, diag(exp(log_var))) summed over the last axis."""
  return -0.5 * jnp.sum(jnp.square(z - mean) * jnp.exp(-log_var) + log_var + math.log(2 * math.pi),
                        axis=-1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  return -0.5 * jnp.sum(jnp.square(z) + math.log(2 * math.pi), axis=-1)


# ---------------------------------------------------------------------------------------------
# Networks.
# ---------------------------------------------------------------------------------------------
class MLP(nnx.Module):
  """Dense layers with an activation between them (none after the last)."""

  def __init__(self, sizes: tuple[int, ...], activation: str, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.act = ACTIVATIONS[activation]

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = self.act(x)
    return x


class ConvEncoderTrunk(nnx.Module):
  """[batch, H, W, C] -> [batch, H/4 * W/4 * c2]: two stride-2 4x4 convolutions."""

  def __init__(self, in_channels: int, channels: tuple[int, int], activation: str, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.conv1 = nnx.Conv(in_channels, channels[0], (4, 4), strides=2, **kw)
    self.conv2 = nnx.Conv(channels[0], channels[1], (4, 4), strides=2, **kw)
    self.act = ACTIVATIONS[activation]

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.act(self.conv2(self.act(self.conv1(x))))
    return x.reshape(x.shape[0], -1)


class ConvDecoderHead(nnx.Module):
  """[batch, H/4 * W/4 * c2] -> [batch, H, W, C]: two 2x sub-pixel upsampling convolutions."""

  def __init__(self, image_shape: tuple[int, int, int], channels: tuple[int, int],
               activation: str, *, dtype=jnp.float32, rngs: nnx.Rngs):
    h, w, c = image_shape
    self.start = (h // 4, w // 4, channels[1])
    self.up1 = UpConv(channels[1], channels[0], dtype=dtype, rngs=rngs)
    self.up2 = UpConv(channels[0], c, dtype=dtype, rngs=rngs)
    self.act = ACTIVATIONS[activation]

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.act(x.reshape((x.shape[0],) + self.start))
    return self.up2(self.act(self.up1(x)))


class VAE(nnx.Module):
  """Encoder, decoder and likelihood of a VAE over [batch, H, W, C] images.

  Args:
    image_shape: (H, W, C); the conv architecture needs H and W divisible by 4.
    latent_dim: L.
    hidden: MLP hidden widths (encoder; the decoder mirrors them), or for 'conv' the width of the
      one dense layer between the conv trunk and the latent.
    architecture: 'mlp' | 'conv'.
    likelihood: 'bernoulli' (x in {0, 1}) | 'gaussian' (x in [-1, 1]).
    activation: a key of ACTIVATIONS.
    num_classes: > 0 makes the model class-conditional.
    channels: the conv architecture's two widths.
    learn_scale: Gaussian likelihood: learn a per-pixel log std (else `log_scale` fixed).
    log_scale: Gaussian likelihood: the initial (or fixed) log standard deviation.
    dtype: the networks' activations (bfloat16 for mixed precision); params, the posterior's
      parameters, decoder outputs and every bound stay float32.
  """

  def __init__(self, *, image_shape: tuple[int, int, int], latent_dim: int,
               hidden: tuple[int, ...], architecture: str = 'mlp', likelihood: str = 'bernoulli',
               activation: str = 'tanh', num_classes: int = 0, channels: tuple[int, int] = (32, 64),
               learn_scale: bool = True, log_scale: float = 0.0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if architecture not in ARCHITECTURES:
      raise ValueError(f'architecture={architecture!r}: use one of {ARCHITECTURES}')
    if likelihood not in LIKELIHOODS:
      raise ValueError(f'likelihood={likelihood!r}: use one of {LIKELIHOODS}')
    self.image_shape = tuple(image_shape)
    self.latent_dim = latent_dim
    self.architecture = architecture
    self.likelihood = likelihood
    self.num_classes = num_classes
    h, w, c = image_shape
    dim = h * w * c
    hidden = tuple(hidden)
    if architecture == 'mlp':
      self.enc_trunk = None
      self.encoder = MLP((dim + num_classes,) + hidden + (2 * latent_dim,), activation,
                         dtype=dtype, rngs=rngs)
      self.decoder = MLP((latent_dim + num_classes,) + hidden[::-1] + (dim,), activation,
                         dtype=dtype, rngs=rngs)
      self.dec_head = None
    else:
      if h % 4 or w % 4:
        raise ValueError(f'the conv VAE needs H and W divisible by 4, got {image_shape}')
      flat = (h // 4) * (w // 4) * channels[1]
      self.enc_trunk = ConvEncoderTrunk(c, channels, activation, dtype=dtype, rngs=rngs)
      self.encoder = MLP((flat + num_classes,) + hidden + (2 * latent_dim,), activation,
                         dtype=dtype, rngs=rngs)
      self.decoder = MLP((latent_dim + num_classes,) + hidden[::-1] + (flat,), activation,
                         dtype=dtype, rngs=rngs)
      self.dec_head = ConvDecoderHead(image_shape, channels, activation, dtype=dtype, rngs=rngs)
    self.learn_scale = learn_scale
    if likelihood == 'gaussian':
      init = jnp.full(image_shape, log_scale, jnp.float32)
      self.log_scale = nnx.Param(init) if learn_scale else nnx.Variable(init)

  def _with_labels(self, h: jax.Array, labels: jax.Array | None) -> jax.Array:
    if not self.num_classes:
      return h
    if labels is None:
      raise ValueError('a conditional VAE needs labels')
    onehot = jax.nn.one_hot(labels, self.num_classes, dtype=h.dtype)
    onehot = jnp.broadcast_to(onehot, h.shape[:-1] + (self.num_classes,))
    return jnp.concatenate([h, onehot], axis=-1)

  def encode(self, x: jax.Array, labels: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """[batch, H, W, C] -> (mean, log_var), each [batch, L]."""
    h = x.reshape(x.shape[0], -1) if self.enc_trunk is None else self.enc_trunk(x)
    out = self.encoder(self._with_labels(h, labels)).astype(jnp.float32)
    return out[:, :self.latent_dim], out[:, self.latent_dim:]

  def decode(self, z: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """[..., batch, L] -> [..., batch, H, W, C] logits (Bernoulli) or means (Gaussian)."""
    lead = z.shape[:-1]
    z = z.reshape(-1, z.shape[-1])
    if labels is not None and len(lead) > 1:
      labels = jnp.broadcast_to(labels, lead).reshape(-1)
    h = self.decoder(self._with_labels(z, labels))
    if self.dec_head is not None:
      h = self.dec_head(h)
    return h.astype(jnp.float32).reshape(lead + self.image_shape)

  def log_likelihood(self, x: jax.Array, out: jax.Array) -> jax.Array:
    """log p(x|z) summed over pixels: x [batch, H, W, C], out [..., batch, H, W, C] -> [..., batch]."""
    if self.likelihood == 'bernoulli':
      ll = -optax.sigmoid_binary_cross_entropy(out, jnp.broadcast_to(x, out.shape))
    else:
      log_scale = self.log_scale[...]
      ll = (-0.5 * jnp.square((x - out) * jnp.exp(-log_scale)) - log_scale
            - 0.5 * math.log(2 * math.pi))
    return ll.reshape(out.shape[:-3] + (-1,)).sum(-1)

  def mean_image(self, out: jax.Array) -> jax.Array:
    """Decoder output -> the likelihood's mean in [-1, 1] (for pictures)."""
    return 2.0 * jax.nn.sigmoid(out) - 1.0 if self.likelihood == 'bernoulli' else out


# ---------------------------------------------------------------------------------------------
# Bounds.
# ---------------------------------------------------------------------------------------------
def elbo_terms(vae: VAE, x: jax.Array, labels: jax.Array | None, key: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """One-sample reconstruction term E_q[log p(x|z)] and analytic KL(q(z|x) || p(z)), each [batch].

  The ELBO is their difference; a beta-VAE (Higgins et al. 2017) trains on recon - beta * KL.
  """
  mean, log_var = vae.encode(x, labels)
  z = reparameterize(mean, log_var, key)
  return vae.log_likelihood(x, vae.decode(z, labels)), gaussian_kl(mean, log_var)


def iwae_bound(vae: VAE, x: jax.Array, labels: jax.Array | None, key: jax.Array, k: int,
               chunk: int = 100) -> jax.Array:
  """The importance-weighted bound log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x), [batch].

  Burda et al. (2016), eq. 8: a lower bound on log p(x) that is the ELBO in expectation at k = 1
  and tightens as k grows. The k samples are drawn `chunk` at a time (`lax.map`), so memory is
  that of `chunk` decoder passes whatever k is; padding samples of the last chunk get weight 0.
  """
  if k < 1:
    raise ValueError(f'k={k}: the importance-weighted bound needs k >= 1 samples')
  chunk = min(chunk, k)
  num_chunks = -(-k // chunk)
  mean, log_var = vae.encode(x, labels)

  def log_weights(i):
    z = reparameterize(mean, log_var, jax.random.fold_in(key, i), num=chunk)  # [chunk, B, L]
    lw = (vae.log_likelihood(x, vae.decode(z, labels)) + standard_normal_log_prob(z)
          - diag_gaussian_log_prob(z, mean, log_var))                        # [chunk, B]
    valid = i * chunk + jnp.arange(chunk) < k
    return jnp.where(valid[:, None], lw, -jnp.inf)

  lw = jax.lax.map(log_weights, jnp.arange(num_chunks))  # [num_chunks, chunk, B]
  return jax.nn.logsumexp(lw.reshape(-1, x.shape[0]), axis=0) - math.log(k)
