"""The diffusion family: a DDPM-style UNet on an image dataset, trained by the shared loop.

Training minimises the simple loss (models/diffusion.py) of the prediction type in
`config.diffusion.prediction`, or with `config.diffusion.min_snr_gamma` > 0 that loss weighted by
Min-SNR-gamma (`GaussianDiffusion.loss_weight`; the eval loss stays the simple one, so curves
compare across weightings); a class-conditional model sees its labels replaced by the null
class with probability `config.diffusion.label_dropout`, which trains the unconditional model
that classifier-free guidance needs. The loop keeps the EMA of the params (config.ema_decay) and
evaluates and samples with it.

Bits per dimension: every figure is the variational bound of DDPM eq. 5 (prior L_T, KL terms,
discretised decoder L_0) per pixel in bits, on the model's [-1, 1] scaling of 8-bit pixels (no
dequantisation: the decoder integrates over each pixel's bin), for the reverse model the
samplers use (x0 predictions clipped to [-1, 1] when `config.sampling.clip`, as
improved-diffusion's clip_denoised; unclipped, the last step's term alone can be most of the
bound, see `GaussianDiffusion.vlb_term_bpd`). They estimate the same number and differ only in
how the T terms are summed; each comes with `_stderr`, its standard error across images
(each image's figure has its own draw of t and of the noise, so this covers both):
  `vlb_bits_per_dim_estimate`          `GaussianDiffusion.bpd_estimate`: the first
    training eval (eval/, eval_ema/)   `config.sampling.vlb_exact_steps` terms summed, the rest
                                       sampled at one stratified t per image, on the eval
                                       batches (the same t and noise at every eval, so curves
                                       are comparable; the stderr treats the stratified draws
                                       as independent, which overstates it)
    train.evaluate                     the same with one uniform t per image, on
                                       --likelihood_examples test images
  `vlb_bits_per_dim` (train.evaluate)  all T terms (T network calls per image, ~3-5 s per
                                       MNIST image on the 2-core CPU), on the first
                                       `config.sampling.vlb_images` test images
The estimator is unbiased for the full bound (tests/test_diffusion.py checks both against a
sum over all T terms written out in numpy). Without the exact head (vlb_exact_steps = 0) it
is heavy-tailed: the first terms are by far the largest, so a rare draw of a small t,
multiplied by T, decides the mean.

Sampling (`train.sample`, `train.evaluate`, the grids the loop writes): --sampler (ddpm|ddim),
--steps, --eta, --guidance (scale w; 1 = plain conditional, 0 = unconditional, > 1 stronger
guidance; conditional models only), defaults from `config.sampling`.

Training FLOPs per step (MFU) come from XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import diffusion as diffusion_lib
from models import unet as unet_lib
from train import family as family_lib
from train import images as images_lib
from train import metrics as metrics_lib
from train.errors import UserError

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class DiffusionFamily(images_lib.ImageFamily):
  """config.model: channels, channel_mult, num_res_blocks, attention_resolutions, dropout,
  dropout_bits (32: bernoulli masks; 8 or 16: cheaper ones, `models.layers.dropout`), groups,
  dtype. config.diffusion: schedule (linear|cosine), num_steps (T), prediction
  (eps|x0|v), variance (beta_tilde|beta), label_dropout (p of the null class in training),
  min_snr_gamma (0: the simple loss; gamma > 0: Min-SNR-gamma loss weights).
  config.sampling: sampler, ddim_steps, ddim_eta, guidance, clip (x0 to [-1, 1]), batch (images per
  jitted sampler call), vlb_images, vlb_exact_steps. config.conditional: class-conditional or
  not."""

  name = 'diffusion'
  sample_flags = images_lib.ImageFamily.sample_flags + ('sampler', 'steps', 'eta', 'guidance',
                                                       'group_norm_sums')
  #: The config.diffusion key of the probability of the null condition in training.
  condition_dropout_key = 'label_dropout'

  def __init__(self, config):
    super().__init__(config)
    d = config.diffusion
    try:
      self.diffusion = diffusion_lib.GaussianDiffusion.from_config(
          d.schedule, d.num_steps, d.prediction, d.variance)
    except ValueError as e:
      raise UserError(f'config.diffusion.{e}') from None
    self.min_snr_gamma = float(d.get('min_snr_gamma', 0.0))   # runs written before the key: 0
    if not self.min_snr_gamma >= 0.0:
      raise UserError(f'config.diffusion.min_snr_gamma={self.min_snr_gamma}: must be >= 0 '
                      '(0: the simple loss)')
    p = d[self.condition_dropout_key]
    if not 0.0 <= p < 1.0:
      raise UserError(f'config.diffusion.{self.condition_dropout_key}={p}: must be in [0, 1)')
    if not isinstance(config.sampling.batch, int) or config.sampling.batch < 1:
      raise UserError(f'config.sampling.batch={config.sampling.batch!r}: must be >= 1 (images '
                      'per jitted sampler call)')
    self.dropout_bits = family_lib.dropout_bits(config.model)
    # Runs written before the key: flax's GroupNorm.
    self.group_norm_sums = config.model.get('group_norm_sums', 'reduce')
    if self.group_norm_sums not in unet_lib.GROUP_NORM_SUMS:
      raise UserError(f'config.model.group_norm_sums={self.group_norm_sums!r}: must be one of '
                      f'{unet_lib.GROUP_NORM_SUMS} (how the GroupNorms sum over positions)')
    if config.model.dtype not in _DTYPES:
      raise UserError(f'config.model.dtype={config.model.dtype!r}: use one of {sorted(_DTYPES)}')
    self._samplers: dict[tuple, Any] = {}

  # ---- model and loss ----
  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    m = self.config.model
    return {'model': unet_lib.UNet(
        image_shape=self.image_shape, channels=m.channels, channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks, attention_resolutions=tuple(m.attention_resolutions),
        dropout=m.dropout, dropout_bits=self.dropout_bits, num_classes=self.num_classes,
        groups=m.groups, group_norm_sums=self.group_norm_sums,
        dtype=_DTYPES[m.dtype], rngs=rngs)}

  def _denoiser(self, model, labels, dropout_key=None):
    return lambda x, t: model(x, t, labels, dropout_key=dropout_key)

  def null_condition(self):
    """What stands for "no condition" in classifier-free guidance (the null class id)."""
    return self.num_classes

  def condition(self, batch):
    """The model's condition in `batch` (class labels [B]), or None when unconditional."""
    return batch['label'] if self.conditional else None

  def loss(self, models, batch, rng, *, train: bool):
    x0 = images_lib.to_float(batch['image'])
    loss_key, drop_key, dropout_key = jax.random.split(rng, 3)
    cond = self.condition(batch)
    p = float(self.config.diffusion[self.condition_dropout_key])
    if cond is not None and train and p > 0:
      # Each example's condition (a label, or a caption's tokens) becomes the null one with p.
      drop = jax.random.bernoulli(drop_key, p, cond.shape[:1])
      null = jnp.broadcast_to(jnp.asarray(self.null_condition(), cond.dtype), cond.shape)
      cond = jnp.where(drop.reshape((-1,) + (1,) * (cond.ndim - 1)), null, cond)
    denoise = self._denoiser(models['model'], cond, dropout_key if train else None)
    losses = self.diffusion.training_losses(denoise, x0, loss_key,
                                            min_snr_gamma=self.min_snr_gamma if train else 0.0)
    return losses.mean(), {}

  def vlb_exact_steps(self) -> int:
    """Bound terms the estimates sum exactly (runs written before the key existed: 0)."""
    return min(int(self.config.sampling.get('vlb_exact_steps', 0)), self.diffusion.num_steps - 1)

  def eval_step(self, models, batch):
    x0 = images_lib.to_float(batch['image'])
    denoise = self._denoiser(models['model'], self.condition(batch))
    key = jax.random.key(0)
    loss = self.diffusion.training_losses(denoise, x0, key).mean()
    bpd = self.diffusion.bpd_estimate(denoise, x0, key, exact_steps=self.vlb_exact_steps(),
                                      stratified=True, clip=bool(self.config.sampling.clip))
    # The mean square gives the standard error across the eval images (derived_eval_metrics).
    return {'loss': loss, 'vlb_bits_per_dim_estimate': bpd.mean(),
            'vlb_bits_per_dim_estimate_sq': jnp.mean(bpd ** 2)}

  def derived_eval_metrics(self, metrics):
    metrics = dict(metrics)
    key = 'vlb_bits_per_dim_estimate'
    if key + '_sq' in metrics:
      n = len(self._eval) * int(self.config.batch_size)
      var = max(metrics.pop(key + '_sq') - metrics[key] ** 2, 0.0)
      # Treats the stratified draws as independent: conservative (stratification removes most
      # of the between-timestep variance from the mean).
      metrics[key + '_stderr'] = float(np.sqrt(var / max(n - 1, 1)))
    return metrics

  # ---- sampling ----
  def check_sample_options(self, options: dict[str, Any]) -> dict[str, Any]:
    s = self.config.sampling
    if options.get('guidance') is not None and not self.conditional:
      raise UserError(f'--guidance={options["guidance"]}: this model is unconditional '
                      '(trained without labels), so there is nothing to guide')
    sampler = options.get('sampler') or s.sampler
    steps, eta = options.get('steps'), options.get('eta')
    if sampler == 'ddim':
      steps = s.ddim_steps if steps is None else steps
      eta = s.ddim_eta if eta is None else eta
    try:
      checked = diffusion_lib.check_sampler(sampler, steps, eta, self.diffusion.num_steps)
    except ValueError as e:
      raise UserError(str(e)) from None
    out = {'sampler': sampler, **checked}
    if self.conditional:
      guidance = float(s.guidance if options.get('guidance') is None else options['guidance'])
      if guidance < 0:
        raise UserError(f'--guidance={guidance}: must be >= 0 (1: conditional, 0: unconditional)')
      out['guidance'] = guidance
    sums = options.get('group_norm_sums')
    if sums is not None:   # the same params either way: a sampling choice, not the run's
      if sums not in unet_lib.GROUP_NORM_SUMS:
        raise UserError(f'--group_norm_sums={sums}: must be one of '
                        f'{", ".join(unet_lib.GROUP_NORM_SUMS)} (the run\'s: '
                        f'{self.group_norm_sums})')
      out['group_norm_sums'] = sums
    return out

  def sampler_fn(self, sampler: str, steps: int, eta: float, guidance: float):
    """The jitted whole-chain sampler for these options (cached; compiled once per shape):
    run(graphdef, state, x_T [B, H, W, C], condition [B, ...] | None, rng) -> x_0 [B, H, W, C]."""
    key = (sampler, steps, eta, guidance)
    if key not in self._samplers:
      clip = bool(self.config.sampling.clip)

      @functools.partial(jax.jit, static_argnums=0)
      def run(graphdef, state, x_T, labels, rng):
        model = nnx.merge(graphdef, state)
        if self.conditional:
          denoise = diffusion_lib.guided(lambda x, t, y: model(x, t, y), labels,
                                         self.null_condition(), guidance)
        else:
          denoise = lambda x, t: model(x, t)
        return diffusion_lib.SAMPLERS[sampler](self.diffusion, denoise, x_T, rng, steps=steps,
                                               eta=eta, clip=clip)
      self._samplers[key] = run
    return self._samplers[key]

  def sampling_batch(self) -> int:
    return int(self.config.sampling.batch)

  def generate_images(self, models, rng, num, labels=None, *, sampler='ddim', steps=50,
                      eta=0.0, guidance=1.0, group_norm_sums=None, **options) -> np.ndarray:
    """uint8 [num, H, W, C] from `sampler` (options as `check_sample_options` returns them), in
    chunks of config.sampling.batch images (the last one padded, so one compiled shape);
    `labels`: the condition per image ([num] class ids, or a text model's [num, L] tokens);
    `group_norm_sums`: how the UNet's GroupNorms sum while sampling (None: as trained)."""
    del options
    if labels is None and self.conditional:
      labels = self.default_labels(num)
    model = models['model']
    if group_norm_sums not in (None, self.group_norm_sums):
      model = unet_lib.with_group_norm_sums(model, group_norm_sums)
    graphdef, state = nnx.split(model)
    run = self.sampler_fn(sampler, steps, eta, guidance)
    chunk = min(num, int(self.config.sampling.batch))
    out = []
    for i, lo in enumerate(range(0, num, chunk)):
      key = jax.random.fold_in(rng, i)
      x_T = jax.random.normal(jax.random.fold_in(key, 1), (chunk, *self.image_shape))
      y = None
      if labels is not None:
        part = np.asarray(labels[lo:lo + chunk], np.int32)
        y = jnp.asarray(np.resize(part, (chunk,) + part.shape[1:]))
      out.append(images_lib.to_uint8(run(graphdef, state, x_T, y, key)))
    return np.concatenate(out)[:num]

  def likelihood_metrics(self, models, rng, images, labels, **options) -> dict[str, float]:
    """The variational bound in bits/dim (conditional on the labels for a conditional model),
    each with its standard error across images (`_stderr`): `vlb_bits_per_dim`, all T terms on
    the first config.sampling.vlb_images images, and `vlb_bits_per_dim_estimate`, the unbiased
    estimate (`vlb_exact_steps` terms exact, one uniform t for the rest) on all of them."""
    del options
    graphdef, state = nnx.split(models['model'])
    conditional, exact = self.conditional, self.vlb_exact_steps()
    clip = bool(self.config.sampling.clip)   # the bound of the reverse model we sample from

    def denoiser(state, y):
      model = nnx.merge(graphdef, state)
      return lambda x, t: model(x, t, y if conditional else None)

    @jax.jit
    def estimates(state, x0, y, key):
      return self.diffusion.bpd_estimate(denoiser(state, y), x0, key, exact_steps=exact,
                                         clip=clip)

    @jax.jit
    def terms(state, x0, y, ts, keys):
      return self.diffusion.sum_terms(denoiser(state, y), x0, ts, keys, clip)

    x0 = images_lib.to_float(np.asarray(images))
    y = np.asarray(labels, np.int32)
    chunk = int(self.config.sampling.batch)
    estimate_key, bound_key = jax.random.split(rng)
    progress = metrics_lib.Progress(
        'bound estimate', len(x0), note=f'{exact} terms exact + 1 sampled: {exact + 1} network '
        'calls per image')
    est = []
    for lo in range(0, len(x0), chunk):
      est.append(np.asarray(estimates(state, x0[lo:lo + chunk], y[lo:lo + chunk],
                                      jax.random.fold_in(estimate_key, lo))))
      progress.update(len(est[-1]))
    est = np.concatenate(est)
    n = min(len(x0), int(self.config.sampling.vlb_images))
    steps = self.diffusion.num_steps
    # The full bound (`GaussianDiffusion.bpd`, the same noise per term) in chunks of
    # timesteps, for a progress line every chunk.
    span = min(steps, 100)
    progress = metrics_lib.Progress('full bound', steps, unit='timesteps',
                                    note=f'on {n} images, {span} timesteps per call')
    keys = jax.random.split(bound_key, steps)
    full = np.asarray(self.diffusion.prior_bpd(x0[:n]), np.float64)
    for lo in range(0, steps, span):
      hi = min(lo + span, steps)
      full = full + np.asarray(terms(state, x0[:n], y[:n], jnp.arange(lo, hi), keys[lo:hi]))
      progress.update(hi - lo)
    stderr = lambda v: float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float('nan')
    return {'vlb_bits_per_dim': float(full.mean()), 'vlb_bits_per_dim_stderr': stderr(full),
            'vlb_images': n,
            'vlb_bits_per_dim_estimate': float(est.mean()),
            'vlb_bits_per_dim_estimate_stderr': stderr(est), 'vlb_exact_steps': exact}

  def likelihood_descriptions(self) -> dict[str, str]:
    return {
        'vlb_bits_per_dim': 'variational bound (DDPM eq. 5) in bits/dim, all T terms summed, on '
                            'the first vlb_images test images; +- its standard error across '
                            'those images',
        'vlb_bits_per_dim_estimate': 'unbiased estimate of the same bound (vlb_exact_steps '
                                     'terms exact, one uniform t for the rest) on all '
                                     'likelihood examples; +- its standard error across '
                                     'images, each with its own t and noise'}
