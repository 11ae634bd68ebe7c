"""The GAN family: a DCGAN-style generator and discriminator trained in ONE jitted step.

Each step first updates the discriminator (generator fixed: its samples are a stop-gradient
input), then the generator against the freshly updated discriminator, each with its own
optimizer (`config.optimizer_d`, `config.optimizer_g`) through the shared loop's StepContext.
With `ema_decay` > 0 the loop keeps EMA weights, and samples come from the generator's EMA.

config.loss: 'non_saturating' | 'hinge'; config.r1_gamma: weight of the R1 penalty
gamma/2 E||grad_x D(x)||^2 on real images (0: off); config.model: z_dim, g_channels,
d_channels, g_refine, d_refine (extra 3x3 convs), g_norm (none|pixel); config.conditional:
class-conditional generator and projection discriminator; config.info_codes K > 0 (unconditional
only): InfoGAN (Chen et al. 2016): the generator also takes a categorical code c ~ U{0..K-1}, the
discriminator gets a Q head predicting c from G(z, c), and both steps add config.info_weight
(lambda; 1 in the paper for categorical codes) times the cross-entropy -log Q(c | G(z, c)): the
discriminator's step trains Q on its (fixed) samples, the generator's step trains G to make c
recognisable. The run uses no labels; sampling draws c uniformly with z.

Sampling (`train.sample`, `train.evaluate`): --truncation (the truncation trick) and --best_of K:
each image is the one of K generator samples (same label) that the discriminator scores highest,
a deterministic form of discriminator rejection sampling (Azadi et al. 2019, "Discriminator
Rejection Sampling"): the discriminator is the run's own (its EMA where the run kept one), so
it costs K generator and discriminator passes per image and no training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import gan as gan_lib
from train import images as images_lib
from train.errors import UserError


class GANFamily(images_lib.ImageFamily):

  name = 'gan'
  sample_flags = images_lib.ImageFamily.sample_flags + ('truncation', 'best_of')

  def __init__(self, config):
    super().__init__(config)
    if config.loss not in gan_lib.LOSSES:
      raise UserError(f'config.loss={config.loss!r}: unknown GAN loss '
                      f'(known: {", ".join(gan_lib.LOSSES)})')
    if config.model.get('g_norm', 'none') not in gan_lib.NORMS:
      raise UserError(f'config.model.g_norm={config.model.g_norm!r}: unknown (known: '
                      f'{", ".join(gan_lib.NORMS)})')
    if config.get('r1_gamma', 0.0) < 0:
      raise UserError(f'config.r1_gamma={config.r1_gamma}: must be >= 0')
    self.codes = int(config.get('info_codes', 0))
    if self.codes < 0 or self.codes == 1:
      raise UserError(f'config.info_codes={self.codes}: must be 0 (off) or >= 2 (categories of '
                      'the InfoGAN code)')
    if self.codes and self.conditional:
      raise UserError(f'config.info_codes={self.codes} with config.conditional=True: InfoGAN codes '
                      'are for an unconditional GAN (a conditional one is told its labels)')
    if not config.get('info_weight', 1.0) >= 0:
      raise UserError(f'config.info_weight={config.info_weight}: must be >= 0')

  def setup_data(self, process_index: int, process_count: int) -> None:
    super().setup_data(process_index, process_count)
    if self.image_shape[0] % 4 or self.image_shape[1] % 4:
      raise UserError(f'the DCGAN generator needs H and W divisible by 4; {self.config.data.name}'
                      f' has {self.image_shape}')

  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    m = self.config.model
    dtype = images_lib.activation_dtype(self.config)
    # .get: runs written before these keys existed still load (their networks had none).
    return {'generator': gan_lib.Generator(image_shape=self.image_shape, z_dim=m.z_dim,
                                           channels=m.g_channels,
                                           num_classes=self.num_classes or self.codes,
                                           refine=m.get('g_refine', 0),
                                           norm=m.get('g_norm', 'none'), dtype=dtype, rngs=rngs),
            'discriminator': gan_lib.Discriminator(image_shape=self.image_shape,
                                                   channels=m.d_channels,
                                                   num_classes=self.num_classes,
                                                   refine=m.get('d_refine', 0),
                                                   codes=self.codes, dtype=dtype, rngs=rngs)}

  def optimizers(self, make_tx):
    return {'discriminator': make_tx(self.config.optimizer_d),
            'generator': make_tx(self.config.optimizer)}

  # ---- the two halves of a step ----
  def _labels(self, batch):
    return batch['label'] if self.conditional else None

  def _info(self, d, fake, codes, metrics):
    """InfoGAN: (D's logits on `fake`, info_weight x Q's info loss for `codes`); metrics `info`
    and `code_accuracy` (how often Q's argmax is the code) go into `metrics`."""
    logits, code_logits = d.with_code_logits(fake)
    info = gan_lib.info_loss(code_logits, codes)
    metrics['info'] = info
    metrics['code_accuracy'] = jnp.mean(jnp.argmax(code_logits, -1) == codes)
    return logits, self.config.get('info_weight', 1.0) * info

  def _d_loss(self, models, batch, key):
    d, labels = models['discriminator'], self._labels(batch)
    real = images_lib.to_float(batch['image'])
    metrics = {}
    if self.codes:
      codes = _codes(models['generator'], key, real.shape[0])
      fake = jax.lax.stop_gradient(_fake(models['generator'], key, real.shape[0], codes))
      fake_logits, info = self._info(d, fake, codes, metrics)
      real_logits = d(real)
      loss = gan_lib.discriminator_loss(self.config.loss, real_logits, fake_logits) + info
    else:
      fake = jax.lax.stop_gradient(_fake(models['generator'], key, real.shape[0], labels))
      real_logits, fake_logits = d(real, labels), d(fake, labels)
      loss = gan_lib.discriminator_loss(self.config.loss, real_logits, fake_logits)
    metrics.update(d_real=jnp.mean(real_logits), d_fake=jnp.mean(fake_logits))
    gamma = self.config.get('r1_gamma', 0.0)
    if gamma:
      r1 = jnp.mean(gan_lib.r1_penalty(d, real, labels))
      loss += 0.5 * gamma * r1
      metrics['r1'] = r1
    return loss, metrics

  def _g_loss(self, models, batch, key):
    labels, num = self._labels(batch), batch['image'].shape[0]
    if not self.codes:
      fake = _fake(models['generator'], key, num, labels)
      logits = models['discriminator'](fake, labels)
      return gan_lib.generator_loss(self.config.loss, logits), {}
    codes = _codes(models['generator'], key, num)
    metrics = {}
    logits, info = self._info(models['discriminator'], _fake(models['generator'], key, num, codes),
                              codes, metrics)
    return (gan_lib.generator_loss(self.config.loss, logits) + info,
            {f'g_{k}': v for k, v in metrics.items()})

  def discriminator_update(self, ctx, batch, key):
    """The first half of a step: one optimizer step of the discriminator; G is held fixed."""
    loss, metrics, grads = ctx.value_and_grad(self._d_loss, 'discriminator', batch, key)
    return {'loss_d': loss, **metrics, **ctx.apply_gradients('discriminator', grads)}

  def generator_update(self, ctx, batch, key):
    """The second half: one optimizer step of the generator against the current D."""
    loss, metrics, grads = ctx.value_and_grad(self._g_loss, 'generator', batch, key)
    return {'loss_g': loss, **metrics, **ctx.apply_gradients('generator', grads)}

  def train_step(self, ctx, batch, rng):
    key_d, key_g = jax.random.split(rng)
    metrics = self.discriminator_update(ctx, batch, key_d)
    metrics.update(self.generator_update(ctx, batch, key_g))
    # The loop's `loss` (logged, checked for NaN): the sum of the two players' losses.
    return {'loss': metrics['loss_d'] + metrics['loss_g'], **metrics}

  def loss(self, models, batch, rng, *, train: bool):
    """Both players' losses on a batch (evaluation); the step trains them in turn."""
    key = jax.random.fold_in(rng, 0)
    loss_d, metrics = self._d_loss(models, batch, key)
    loss_g, g_metrics = self._g_loss(models, batch, key)
    return loss_d + loss_g, {'loss_d': loss_d, 'loss_g': loss_g, **metrics, **g_metrics}

  # ---- sampling ----
  def check_sample_options(self, options):
    t = options.get('truncation')
    if t is not None and not t > 0:
      raise UserError(f'--truncation={t}: must be > 0 (latent coordinates kept in [-t, t])')
    k = options.get('best_of')
    if k is not None and k < 1:
      raise UserError(f'--best_of={k}: must be >= 1 (generator samples per image; 1: no '
                      'selection)')
    return options

  def generate_images(self, models, rng, num, labels=None, truncation=None, best_of=None,
                      **options) -> np.ndarray:
    """Generator samples (the EMA generator where the run kept one), uint8 [num, H, W, C];
    `truncation` t: latents from N(0, I) truncated to [-t, t] per coordinate (None: untruncated);
    `best_of` K > 1: each image the discriminator's highest-scored of K samples
    (`discriminator_best_of`)."""
    if labels is None:
      labels = self.default_labels(num)
    labels = None if labels is None else jnp.asarray(labels)
    truncation = None if truncation is None else float(truncation)
    if best_of is not None and best_of > 1:
      images = _generate_best_of(models['generator'], models['discriminator'], rng, num, labels,
                                 truncation, int(best_of))
    else:
      images = _generate(models['generator'], rng, num, labels, truncation)
    return images_lib.to_uint8(images)


def latents(key: jax.Array, num: int, z_dim: int, truncation: float | None = None) -> jax.Array:
  """[num, z_dim] z ~ N(0, I); with `truncation` t, each coordinate from the standard normal
  conditioned on |z_i| <= t (BigGAN's truncation trick, Brock et al. 2019, section 3.1)."""
  if truncation is None:
    return jax.random.normal(key, (num, z_dim))
  return jax.random.truncated_normal(key, -truncation, truncation, (num, z_dim))


def _codes(generator: gan_lib.Generator, key: jax.Array, num: int) -> jax.Array:
  """[num] InfoGAN codes, uniform over the generator's `num_classes`, drawn from `key`."""
  return jax.random.randint(jax.random.fold_in(key, 1), (num,), 0, generator.num_classes)


def _fake(generator: gan_lib.Generator, key: jax.Array, num: int, labels,
          truncation: float | None = None) -> jax.Array:
  """[num, H, W, C] generator samples of `latents(key, num, z_dim, truncation)`; a generator
  that takes labels or codes (`num_classes` > 0) called with `labels` None draws its codes with
  `_codes(generator, key, num)` (InfoGAN; the conditional family always passes labels)."""
  if labels is None and generator.num_classes:
    labels = _codes(generator, key, num)
  return generator(latents(key, num, generator.z_dim, truncation), labels)


_generate = nnx.jit(_fake, static_argnums=(2, 4))


def discriminator_best_of(generator: gan_lib.Generator, discriminator: gan_lib.Discriminator,
                          key: jax.Array, num: int, labels, truncation: float | None,
                          k: int) -> jax.Array:
  """[num, H, W, C]: image i is the one of the generator samples k*i .. k*i+k-1 of
  `_fake(generator, key, num * k, labels repeated k times, truncation)` with the highest
  discriminator logit. k = 1 is `_fake(generator, key, num, labels, truncation)`."""
  repeated = None if labels is None else jnp.repeat(labels, k)
  candidates = _fake(generator, key, num * k, repeated, truncation)
  scores = discriminator(candidates, repeated).reshape(num, k)
  candidates = candidates.reshape((num, k) + candidates.shape[1:])
  return candidates[jnp.arange(num), jnp.argmax(scores, axis=1)]


_generate_best_of = nnx.jit(discriminator_best_of, static_argnums=(3, 5, 6))
