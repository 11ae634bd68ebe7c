"""The VAE family: a variational autoencoder trained on the ELBO (beta-weighted KL optional).

Pixels: with `model.likelihood='bernoulli'` the images must be binary: `data.binarize='dynamic'`
draws x ~ Bernoulli(pixel / 255) afresh at every step from the step's key (Burda et al. 2016),
'static' binarises the training set once; the test set is always binarised once with a fixed
seed (`binarize_fixed`), so every evaluation scores the same binary images. With 'gaussian'
pixels are dequantised (x + u, u ~ U[0, 1)) and scaled to [-1, 1]; test NLLs are then bounds
on the discrete data's NLL (Theis et al. 2016).

Evaluation: the loop's evals report the ELBO terms (and the IWAE bound with
`eval_iwae_samples` > 0); `likelihood_metrics` (used by `train.evaluate`) gives the test NLL
estimate with the importance-weighted bound at k = `iwae_samples` (default 5000).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import vae as vae_lib
from train import data as data_lib
from train import images as images_lib
from train import metrics as metrics_lib
from train.errors import UserError

BINARIZE = ('dynamic', 'static', 'none')
_TEST_BINARIZE_SEED = 0


def binarize_fixed(images: np.ndarray, seed: int = _TEST_BINARIZE_SEED) -> np.ndarray:
  """uint8 [N, H, W, C] -> uint8 {0, 255}: pixel on with probability pixel / 255, fixed seed."""
  u = np.random.default_rng(seed).random(images.shape, dtype=np.float32)
  return np.where(u < images.astype(np.float32) / 255.0, 255, 0).astype(np.uint8)


class VAEFamily(images_lib.ImageFamily):
  """config.model: architecture ('mlp' | 'conv'), hidden (widths), latent_dim, activation,
  channels (conv), likelihood ('bernoulli' | 'gaussian'), learn_scale, log_scale (Gaussian);
  config.data.binarize ('dynamic' | 'static' | 'none'); config.beta (KL weight, 1 = ELBO);
  config.conditional; config.iwae_samples (k of the test NLL), config.iwae_chunk (samples per
  decoder pass), config.iwae_batch (images per pass); config.eval_iwae_samples (k of the
  IWAE bound in the loop's evals; 0: off)."""

  name = 'vae'

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    checks = [('model.likelihood', m.likelihood, vae_lib.LIKELIHOODS),
              ('model.architecture', m.architecture, vae_lib.ARCHITECTURES),
              ('model.activation', m.activation, tuple(vae_lib.ACTIVATIONS)),
              ('data.binarize', self.binarize, BINARIZE)]
    for key, value, known in checks:
      if value not in known:
        raise UserError(f'config.{key}={value!r}: unknown (known: {", ".join(known)})')
    if config.get('beta', 1.0) < 0:
      raise UserError(f'config.beta={config.beta}: must be >= 0')
    self.iwae_samples = check_k(config.get('iwae_samples', 5000), 'config.iwae_samples')
    if config.get('eval_iwae_samples', 0) < 0:
      raise UserError(f'config.eval_iwae_samples={config.eval_iwae_samples}: must be >= 0 '
                      '(0: off)')

  @property
  def binarize(self) -> str:
    return self.config.data.get('binarize', 'none')

  @property
  def bernoulli(self) -> bool:
    return self.config.model.likelihood == 'bernoulli'

  # ---- data ----
  def setup_data(self, process_index: int, process_count: int) -> None:
    super().setup_data(process_index, process_count)
    c = self.config
    train_images = self._train.images
    if self.bernoulli and self.binarize == 'none':
      levels = np.unique(train_images[:1000])
      if not np.isin(levels, (0, 255)).all():
        raise UserError(
            f'config.model.likelihood=bernoulli needs binary pixels, but {c.data.name} has '
            f'{len(levels)} grey levels: set --config.data.binarize=dynamic (or static), or use '
            '--config.model.likelihood=gaussian')
    if c.model.architecture == 'conv' and (self.image_shape[0] % 4 or self.image_shape[1] % 4):
      raise UserError(f'config.model.architecture=conv needs H and W divisible by 4, '
                      f'{c.data.name} has {self.image_shape}: use architecture=mlp')
    if self.bernoulli and self.binarize != 'none':
      if self.binarize == 'static':
        self._train.images = binarize_fixed(train_images, seed=c.seed + 1)
      ds = data_lib.load_images(c.data.name, c.data.data_dir, c.data.raw_dir)
      images, labels = ds['test' if 'test' in ds else 'train']
      self._eval = data_lib.fixed_batches(
          binarize_fixed(images), labels, global_batch_size=c.batch_size,
          num_batches=c.get('eval_batches', 10), process_index=process_index,
          process_count=process_count)

  def _pixels(self, images: jax.Array, key: jax.Array, train: bool) -> jax.Array:
    """uint8 batch -> the float pixels the likelihood models ({0, 1} or [-1, 1])."""
    if self.bernoulli:
      p = images.astype(jnp.float32) / 255.0
      if train and self.binarize == 'dynamic':
        return jax.random.bernoulli(key, p).astype(jnp.float32)
      return p  # already binary: checked or binarised in setup_data
    u = jax.random.uniform(key, images.shape)
    return (images.astype(jnp.float32) + u) / 128.0 - 1.0

  def _labels(self, batch) -> jax.Array | None:
    return batch['label'] if self.conditional else None

  # ---- model and loss ----
  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    m = self.config.model
    return {'model': vae_lib.VAE(
        image_shape=self.image_shape, latent_dim=m.latent_dim, hidden=tuple(m.hidden),
        architecture=m.architecture, likelihood=m.likelihood, activation=m.activation,
        num_classes=self.num_classes, channels=tuple(m.channels),
        learn_scale=m.learn_scale, log_scale=m.log_scale,
        dtype=images_lib.activation_dtype(self.config), rngs=rngs)}

  def loss(self, models, batch, rng, *, train: bool):
    pixel_key, z_key = jax.random.split(rng)
    x = self._pixels(batch['image'], pixel_key, train)
    recon, kl = vae_lib.elbo_terms(models['model'], x, self._labels(batch), z_key)
    beta = self.config.get('beta', 1.0) if train else 1.0
    loss = -jnp.mean(recon - beta * kl)
    return loss, {'elbo': jnp.mean(recon - kl), 'recon_nll': -jnp.mean(recon),
                  'kl': jnp.mean(kl)}

  def eval_step(self, models, batch):
    metrics = super().eval_step(models, batch)
    k = int(self.config.get('eval_iwae_samples', 0))
    if k:
      pixel_key, z_key = jax.random.split(jax.random.key(1))
      x = self._pixels(batch['image'], pixel_key, False)
      bound = vae_lib.iwae_bound(models['model'], x, self._labels(batch), z_key, k,
                                 chunk=min(k, int(self.config.get('iwae_chunk', 100))))
      metrics[f'iwae{k}_nll'] = -jnp.mean(bound)
    return metrics

  # ---- sampling and likelihood ----
  def generate_images(self, models, rng, num, labels=None, **options) -> np.ndarray:
    """Decoder means of z ~ N(0, I), as uint8 [num, H, W, C]."""
    return images_lib.to_uint8(_prior_means(models['model'], rng, num,
                                            None if labels is None else jnp.asarray(labels)))

  def likelihood_metrics(self, models, rng, images, labels, **options) -> dict[str, float]:
    """Test NLL from the importance-weighted bound with k = `iwae_samples` (option or config).

    Bernoulli: `images` are binarised with the fixed test seed; {'iwae_nll_nats': ...}.
    Gaussian: an upper bound on the discrete pixels' NLL through uniform dequantisation,
    in nats and bits per dimension.
    """
    c = self.config
    k = options.get('iwae_samples')
    k = check_k(self.iwae_samples if k is None else k, 'iwae_samples')
    chunk = min(k, int(options.get('iwae_chunk') or c.get('iwae_chunk', 100)))
    batch = int(options.get('iwae_batch') or c.get('iwae_batch', 100))
    images = binarize_fixed(images) if self.bernoulli else images
    vae = models['model']
    total = 0.0
    progress = metrics_lib.Progress(
        'IWAE test NLL', len(images), note=f'k={k} drawn {chunk} at a time, {batch} images per batch')
    for i, lo in enumerate(range(0, len(images), batch)):
      key = jax.random.fold_in(rng, i)
      pixel_key, z_key = jax.random.split(key)
      x = self._pixels(jnp.asarray(images[lo:lo + batch]), pixel_key, False)
      y = None if labels is None or not self.conditional else jnp.asarray(labels[lo:lo + batch])
      total += float(jnp.sum(_iwae(vae, x, y, z_key, k, chunk)))
      progress.update(len(x))
    nll = -total / len(images)
    if self.bernoulli:
      return {'iwae_nll_nats': nll, 'iwae_samples': k}
    dims = math.prod(self.image_shape)
    nll += dims * math.log(128.0)  # density on [-1, 1] -> probability of a pixel bin of 2/256
    return {'iwae_nll_nats': nll, 'iwae_bits_per_dim': nll / (dims * math.log(2.0)),
            'iwae_samples': k}

  def write_samples(self, models, rng, path: str) -> None:
    """Prior samples (path.png), test reconstructions (path_recon.png: rows alternate originals
    and reconstructions) and latent interpolations (path_interp.png: each row decodes the
    straight line between two test images' posterior means)."""
    super().write_samples(models, rng, path)
    batch = next(iter(self.eval_batches()), None)
    if batch is None or len(batch['image']) < 16:
      return
    vae = models['model']
    x = self._pixels(jnp.asarray(batch['image'][:16]), rng, False)
    labels = self._labels({k: jnp.asarray(v[:16]) for k, v in batch.items()})
    recon, interp = _recon_and_interp(vae, x, labels)
    originals = images_lib.to_uint8(2.0 * x - 1.0 if self.bernoulli else x)
    recon = images_lib.to_uint8(recon)
    rows = np.concatenate([originals[:8], recon[:8], originals[8:], recon[8:]])
    images_lib.save_grid(path + '_recon', rows, ncols=8)
    images_lib.save_grid(path + '_interp', images_lib.to_uint8(interp), ncols=10)


def check_k(k, name: str) -> int:
  if not isinstance(k, int) or k < 1:
    raise UserError(f'{name}={k!r}: the importance-weighted bound needs k >= 1 samples')
  return k


@nnx.jit(static_argnums=(2,))
def _prior_means(vae: vae_lib.VAE, key: jax.Array, num: int, labels: jax.Array | None):
  z = jax.random.normal(key, (num, vae.latent_dim))
  return vae.mean_image(vae.decode(z, labels))


@nnx.jit(static_argnums=(4, 5))
def _iwae(vae, x, labels, key, k: int, chunk: int):
  return vae_lib.iwae_bound(vae, x, labels, key, k, chunk)


@nnx.jit
def _recon_and_interp(vae: vae_lib.VAE, x: jax.Array, labels: jax.Array | None):
  """Reconstructions [16, H, W, C] and 8 rows of 10 interpolation steps [80, H, W, C], in [-1, 1]."""
  mean, _ = vae.encode(x, labels)
  recon = vae.mean_image(vae.decode(mean, labels))
  t = jnp.linspace(0.0, 1.0, 10)[None, :, None]
  z = (1 - t) * mean[0::2, None] + t * mean[1::2, None]           # [8, 10, L]
  row_labels = None if labels is None else jnp.repeat(labels[0::2], 10)
  interp = vae.mean_image(vae.decode(z.reshape(80, -1), row_labels))
  return recon, interp
