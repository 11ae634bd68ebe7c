"""Gaussian diffusion (DDPM, Ho et al. 2020): schedules, forward process, losses, bound, samplers.

Time convention (as improved-diffusion): integer t in [0, T) indexes the schedule, and
`q_sample(x0, t)` draws the paper's x_{t+1}; t = 0 is the last denoising step, whose decoder
p(x_0 | x_1) is the discretised Gaussian of the paper's section 3.3.

A denoiser is any function `denoise_fn(x_t, t) -> output` with x_t [B, ...] and t [B] int32,
whose output is the `prediction` type of the `GaussianDiffusion` ('eps': the noise, 'x0': the
clean image, 'v': sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022). Class conditioning
and classifier-free guidance are folded into `denoise_fn` (see `guided`).

Samplers (`SAMPLERS`, chosen by name) run all their steps inside one `lax.scan`, so a jitted
caller compiles one program for the whole chain:
  ddpm: ancestral sampling over all T steps (paper algorithm 2);
  ddim: `steps` evenly spaced steps (trailing spacing: the first one is t = T - 1), noise
        scale eta in [0, 1] (Song et al. 2021, eq. 12 and 16); eta = 0 is deterministic, and
        eta = 1 with steps = T is DDPM with the posterior variance beta-tilde.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Noise schedules: betas [T], float64 numpy.
# ---------------------------------------------------------------------------------------------
def linear_beta_schedule(num_steps: int) -> np.ndarray:
  """DDPM's linear betas from 1e-4 to 0.02, scaled by 1000 / T so any T spans the same noise."""
  scale = 1000.0 / num_steps
  return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def cosine_beta_schedule(num_steps: int, s: float = 0.008, max_beta: float = 0.999
                         ) -> np.ndarray:
  """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at 0.999."""
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta)
                   for i in range(num_steps)], np.float64)


SCHEDULES = {'linear': linear_beta_schedule, 'cosine': cosine_beta_schedule}
PREDICTIONS = ('eps', 'x0', 'v')
VARIANCES = ('beta_tilde', 'beta')   # fixed reverse variances: posterior (small) or beta (large)


# ---------------------------------------------------------------------------------------------
# Gaussian helpers (improved-diffusion's losses.py), elementwise, in nats.
# ---------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(x) of 8-bit data x in [-1, 1] (256 bins of width 2/255) under N(mean, exp(log_scale)^2)
  integrated over x's bin; the end bins extend to -inf / +inf (DDPM section 3.3). Elementwise."""
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
  return x.reshape(x.shape[0], -1).mean(axis=1)


# ---------------------------------------------------------------------------------------------
# The process.
# ---------------------------------------------------------------------------------------------
class GaussianDiffusion:
  """Schedule constants and the maths of one diffusion process (no parameters).

  Args:
    betas: [T] noise schedule, e.g. `cosine_beta_schedule(1000)`.
    prediction: what the network predicts: 'eps', 'x0' or 'v'.
    variance: the fixed reverse variance, 'beta_tilde' (posterior) or 'beta' (DDPM's two
      choices, section 3.2).
  """

  def __init__(self, betas: np.ndarray, prediction: str = 'eps', variance: str = 'beta_tilde'):
    if prediction not in PREDICTIONS:
      raise ValueError(f'prediction={prediction!r}: use one of {PREDICTIONS}')
    if variance not in VARIANCES:
      raise ValueError(f'variance={variance!r}: use one of {VARIANCES}')
    betas = np.asarray(betas, np.float64)
    self.num_steps = len(betas)
    self.prediction, self.variance = prediction, variance
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)                        # eq. 7
    # log(beta-tilde_0) = -inf: the log is clipped to beta-tilde_1 as improved-diffusion does.
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    model_var = post_var if variance == 'beta_tilde' else np.append(post_var[1], betas[1:])
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = f32(betas), f32(abar), f32(abar_prev)
    self.one_minus_abar = f32(1.0 - abar)   # in float64 first: 1 - abar_0 is ~1e-5
    self.sqrt_abar, self.sqrt_one_minus_abar = f32(np.sqrt(abar)), f32(np.sqrt(1.0 - abar))
    self.posterior_variance, self.posterior_log_variance = f32(post_var), f32(post_logvar)
    self.posterior_coef_x0 = f32(betas * np.sqrt(abar_prev) / (1.0 - abar))
    self.posterior_coef_xt = f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))
    self.model_variance = f32(model_var)
    self.model_log_variance = f32(np.log(np.append(post_var[1], model_var[1:])))
    self.snr = f32(abar / (1.0 - abar))   # signal-to-noise ratio abar / (1 - abar) of x_t

  @classmethod
  def from_config(cls, schedule: str, num_steps: int, prediction: str, variance: str):
    if schedule not in SCHEDULES:
      raise ValueError(f'schedule={schedule!r}: use one of {sorted(SCHEDULES)}')
    if num_steps < 1:
      raise ValueError(f'num_steps={num_steps}: must be >= 1')
    return cls(SCHEDULES[schedule](num_steps), prediction, variance)

  @staticmethod
  def _at(a: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """a[t] [B] broadcast against x [B, ...]."""
    return a[t].reshape((-1,) + (1,) * (x.ndim - 1))

  # ---- forward process ----
  def q_mean_variance(self, x0, t):
    """Mean, variance and log variance of q(x_t | x_0) = N(sqrt(abar) x0, 1 - abar) (eq. 4)."""
    var = self._at(self.one_minus_abar, t, x0)
    return self._at(self.sqrt_abar, t, x0) * x0, var, jnp.log(var)

  def q_sample(self, x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return self._at(self.sqrt_abar, t, x0) * x0 + self._at(self.sqrt_one_minus_abar, t, x0) * noise

  def q_posterior_mean_variance(self, x0, x_t, t):
    """Mean, variance and (clipped) log variance of q(x_{t-1} | x_t, x_0) (eq. 6, 7)."""
    mean = self._at(self.posterior_coef_x0, t, x_t) * x0 + self._at(self.posterior_coef_xt, t, x_t) * x_t
    return (mean, self._at(self.posterior_variance, t, x_t),
            self._at(self.posterior_log_variance, t, x_t))

  # ---- conversions between x0, eps and v (exact inverses given x_t) ----
  def x0_from_eps(self, x_t, t, eps):
    return (x_t - self._at(self.sqrt_one_minus_abar, t, x_t) * eps) / self._at(self.sqrt_abar, t, x_t)

  def eps_from_x0(self, x_t, t, x0):
    return (x_t - self._at(self.sqrt_abar, t, x_t) * x0) / self._at(self.sqrt_one_minus_abar, t, x_t)

  def v_from_x0_eps(self, x0, eps, t):
    return self._at(self.sqrt_abar, t, x0) * eps - self._at(self.sqrt_one_minus_abar, t, x0) * x0

  def x0_from_v(self, x_t, t, v):
    return self._at(self.sqrt_abar, t, x_t) * x_t - self._at(self.sqrt_one_minus_abar, t, x_t) * v

  def target(self, x0, eps, t):
    """What the network should output for (x0, eps) at t, per `prediction`."""
    return {'eps': eps, 'x0': x0, 'v': self.v_from_x0_eps(x0, eps, t)}[self.prediction]

  def predict_x0_eps(self, output, x_t, t, clip: bool = False):
    """(x0, eps) from a network output; with `clip`, x0 is clipped to [-1, 1] and eps follows."""
    if self.prediction == 'eps':
      x0 = self.x0_from_eps(x_t, t, output)
    elif self.prediction == 'x0':
      x0 = output
    else:
      x0 = self.x0_from_v(x_t, t, output)
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
    eps = output if self.prediction == 'eps' and not clip else self.eps_from_x0(x_t, t, x0)
    return x0, eps

  def p_mean_variance(self, denoise_fn: DenoiseFn, x_t, t, clip: bool = False):
    """Mean, variance, log variance of p(x_{t-1} | x_t), and the predicted x0."""
    x0, _ = self.predict_x0_eps(denoise_fn(x_t, t), x_t, t, clip)
    mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
    return mean, self._at(self.model_variance, t, x_t), self._at(self.model_log_variance, t, x_t), x0

  # ---- training ----
  def loss_weight(self, t: jax.Array, min_snr_gamma: float) -> jax.Array:
    """Min-SNR-gamma weights [B] of the per-example loss at t (Hang et al. 2023, "Efficient
    Diffusion Training via Min-SNR Weighting Strategy", arXiv:2303.09556): the loss in x0 space
    weighted by min(SNR_t, gamma), written for the target the network predicts (eps:
    min(SNR, gamma) / SNR; x0: min(SNR, gamma); v: min(SNR, gamma) / (SNR + 1))."""
    snr = self.snr[t]
    clipped = jnp.minimum(snr, min_snr_gamma)
    return {'eps': clipped / snr, 'x0': clipped, 'v': clipped / (snr + 1.0)}[self.prediction]

  def training_losses(self, denoise_fn: DenoiseFn, x0, rng, *,
                      min_snr_gamma: float = 0.0) -> jax.Array:
    """Per-example [B] mean squared error of the network output against its target (eps, x0
    or v) at a uniform random t: the simple loss (DDPM eq. 14) when `min_snr_gamma` is 0,
    otherwise weighted by `loss_weight`."""
    t_key, noise_key = jax.random.split(rng)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, self.num_steps)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    out = denoise_fn(self.q_sample(x0, t, noise), t)
    loss = _mean_flat((out.astype(jnp.float32) - self.target(x0, noise, t)) ** 2)
    if min_snr_gamma:
      loss = loss * self.loss_weight(t, min_snr_gamma)
    return loss

  # ---- variational bound (DDPM eq. 5), bits per dimension ----
  def prior_bpd(self, x0) -> jax.Array:
    """[B] KL(q(x_T | x_0) || N(0, I)) in bits/dim: L_T, no parameters."""
    t = jnp.full((x0.shape[0],), self.num_steps - 1, jnp.int32)
    mean, _, logvar = self.q_mean_variance(x0, t)
    return _mean_flat(normal_kl(mean, logvar, 0.0, 0.0)) / math.log(2.0)

  def vlb_term_bpd(self, denoise_fn: DenoiseFn, x0, t, noise, clip: bool = False) -> jax.Array:
    """[B] the bound's term at t in bits/dim: KL(q(x_t|x_{t+1},x_0) || p(x_t|x_{t+1})) for t > 0,
    the discretised decoder's -log p(x_0 | x_1) for t = 0 (x0 must lie on the 8-bit grid).

    `clip`: the reverse model whose bound this is predicts x0 clipped to [-1, 1], as the
    samplers do with clip=True (improved-diffusion's clip_denoised). Without it, the term at
    t = T - 1 of a cosine schedule (beta clipped at 0.999) amplifies the network's eps error
    by 1 / sqrt(alpha) ~ 32 in the mean, i.e. ~1000 in the KL, and can dominate the bound."""
    x_t = self.q_sample(x0, t, noise)
    true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, x_t, t)
    mean, _, logvar, _ = self.p_mean_variance(denoise_fn, x_t, t, clip)
    kl = _mean_flat(normal_kl(true_mean, true_logvar, mean, logvar))
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar))
    return jnp.where(t == 0, nll, kl) / math.log(2.0)

  def bpd_estimate(self, denoise_fn: DenoiseFn, x0, rng, *, exact_steps: int = 0,
                   stratified: bool = False, clip: bool = False) -> jax.Array:
    """[B] an unbiased one-sample estimate of the bound (`bpd`) in bits/dim:

      L_T + sum_{t < exact_steps} L_t + (T - exact_steps) * L_s,  s uniform in [exact_steps, T)

    Over s and the noise its expectation is the full bound. L_t (per dimension) is largest and
    most variable at the least noisy steps (the decoder L_0 and the first KLs: their weight in
    DDPM eq. 12 falls roughly as 1/t), so with exact_steps = 0 the estimate is heavy-tailed: a
    rare draw of a small t, multiplied by T, dominates a mean over hundreds of images. Summing
    the first `exact_steps` terms exactly (one network call each) removes that tail.
    `stratified`: the B draws of s are stratified over [exact_steps, T) (one per 1/B slice,
    randomly assigned to the images): still unbiased for the batch mean, less variable.
    `clip`: as in `vlb_term_bpd`.
    """
    num_steps = self.num_steps
    if not 0 <= exact_steps < num_steps:
      raise ValueError(f'exact_steps={exact_steps}: must be in [0, T={num_steps})')
    t_key, noise_key, perm_key, head_key = jax.random.split(rng, 4)
    b, tail = x0.shape[0], num_steps - exact_steps
    if stratified:
      u = (jnp.arange(b) + jax.random.uniform(t_key, (b,))) / b
      s = jax.random.permutation(perm_key, jnp.minimum((u * tail).astype(jnp.int32), tail - 1))
    else:
      s = jax.random.randint(t_key, (b,), 0, tail)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    total = (tail * self.vlb_term_bpd(denoise_fn, x0, s + exact_steps, noise, clip)
             + self.prior_bpd(x0))
    if exact_steps:
      total += self.sum_terms(denoise_fn, x0, jnp.arange(exact_steps),
                              jax.random.split(head_key, exact_steps), clip)
    return total

  def sum_terms(self, denoise_fn: DenoiseFn, x0, ts, keys, clip: bool = False) -> jax.Array:
    """[B] sum of the bound's terms at timesteps `ts` [K], one network call each; the noise of
    the term at ts[k] is drawn with keys[k]."""
    def body(total, inputs):
      t, key = inputs
      tt = jnp.full((x0.shape[0],), t, jnp.int32)
      noise = jax.random.normal(key, x0.shape)
      return total + self.vlb_term_bpd(denoise_fn, x0, tt, noise, clip), None
    total, _ = lax.scan(body, jnp.zeros(x0.shape[0], jnp.float32), (ts, keys))
    return total

  def bpd(self, denoise_fn: DenoiseFn, x0, rng, clip: bool = False) -> jax.Array:
    """[B] the full bound in bits/dim (DDPM eq. 5): all T terms plus the prior L_T (T network
    calls; the noise of term t drawn with `jax.random.split(rng, T)[t]`). Still one draw of
    the noise per term, but every t is counted."""
    return self.prior_bpd(x0) + self.sum_terms(
        denoise_fn, x0, jnp.arange(self.num_steps), jax.random.split(rng, self.num_steps), clip)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ---------------------------------------------------------------------------------------------
def guided(model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], labels: jax.Array,
           null_label: int | jax.Array, scale: float) -> DenoiseFn:
  """Classifier-free guidance (Ho & Salimans 2022) as a denoiser of (x_t, t).

  `labels` is the condition per example ([B] class ids, or [B, L] caption tokens) and
  `null_label` the null condition, broadcast to its shape (the null class id, or a null
  caption's [L] tokens).

  out = out_uncond + scale * (out_cond - out_uncond): scale 1 is the plain conditional model,
  0 the unconditional one, > 1 strengthens the condition (Ho & Salimans's w is scale - 1).
  Mixing any prediction type (eps, x0, v) is the same: each is affine in the others at fixed
  x_t with coefficients that sum to one. Scale 1 costs one network call; otherwise the
  conditional and null-label inputs go through the network as one doubled batch.
  """
  null = jnp.broadcast_to(jnp.asarray(null_label, labels.dtype), labels.shape)
  if scale == 1.0:
    return lambda x, t: model_fn(x, t, labels)
  if scale == 0.0:
    return lambda x, t: model_fn(x, t, null)

  def denoise(x, t):
    both = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(both, 2)
    return uncond + scale * (cond - uncond)
  return denoise


# ---------------------------------------------------------------------------------------------
# Reverse samplers: each is one lax.scan over its steps.
# ---------------------------------------------------------------------------------------------
def ddpm_sample(diffusion: GaussianDiffusion, denoise_fn: DenoiseFn, x_T, rng, *,
                clip: bool = True, steps: int | None = None, eta: float | None = None):
  """Ancestral sampling (DDPM algorithm 2) from x_T [B, ...] over all T steps; no noise is added
  at the last step. `steps` (must be T) and `eta` (must be 1) exist for the registry."""
  del steps, eta
  def body(x, inputs):
    t, key = inputs
    tt = jnp.full((x.shape[0],), t, jnp.int32)
    mean, _, logvar, _ = diffusion.p_mean_variance(denoise_fn, x, tt, clip)
    noise = jax.random.normal(key, x.shape, x.dtype)
    return mean + jnp.where(t > 0, jnp.exp(0.5 * logvar), 0.0) * noise, None
  ts = jnp.arange(diffusion.num_steps - 1, -1, -1)
  x, _ = lax.scan(body, x_T, (ts, jax.random.split(rng, diffusion.num_steps)))
  return x


def ddim_timesteps(num_steps: int, steps: int) -> np.ndarray:
  """[steps] decreasing timesteps, evenly spaced and starting at T - 1 ('trailing' spacing)."""
  return np.round(num_steps - np.arange(steps) * num_steps / steps).astype(np.int32) - 1


def ddim_sample(diffusion: GaussianDiffusion, denoise_fn: DenoiseFn, x_T, rng, *,
                steps: int = 50, eta: float = 0.0, clip: bool = True):
  """DDIM (Song et al. 2021, eq. 12) from x_T [B, ...] in `steps` steps with noise scale eta:
  sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))."""
  ts = ddim_timesteps(diffusion.num_steps, steps)
  abar = np.asarray(diffusion.alphas_cumprod, np.float64)
  prev = np.append(abar[ts[1:]], 1.0)   # the last step goes to abar = 1, i.e. x_0
  cur = abar[ts]
  sigma = eta * np.sqrt((1 - prev) / (1 - cur) * (1 - cur / prev))
  dir_coef = np.sqrt(np.maximum(1 - prev - sigma ** 2, 0.0))
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  def body(x, inputs):
    t, sqrt_prev, d, s, key = inputs
    tt = jnp.full((x.shape[0],), t, jnp.int32)
    x0, eps = diffusion.predict_x0_eps(denoise_fn(x, tt), x, tt, clip)
    x = sqrt_prev * x0 + d * eps + s * jax.random.normal(key, x.shape, x.dtype)
    return x, None
  xs = (jnp.asarray(ts), f32(np.sqrt(prev)), f32(dir_coef), f32(sigma), jax.random.split(rng, steps))
  x, _ = lax.scan(body, x_T, xs)
  return x


def ddim_encode(diffusion: GaussianDiffusion, denoise_fn: DenoiseFn, x0, *, steps: int = 50):
  """DDIM inversion: the deterministic (eta = 0) ODE run from x0 up to x_T [B, ...] over the
  timesteps `ddim_sample` uses, so `ddim_sample(encode(x0), eta=0)` approximately returns x0."""
  ts = ddim_timesteps(diffusion.num_steps, steps)[::-1]
  abar = np.asarray(diffusion.alphas_cumprod, np.float64)
  cur = np.append(1.0, abar[ts[:-1]])
  eval_t = np.append(ts[0], ts[:-1])   # the network is never asked about abar = 1
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  def body(x, inputs):
    t, a_cur, a_next = inputs
    tt = jnp.full((x.shape[0],), t, jnp.int32)
    out = denoise_fn(x, tt)
    _, eps = diffusion.predict_x0_eps(out, x, tt)
    x0 = (x - jnp.sqrt(1 - a_cur) * eps) / jnp.sqrt(a_cur)
    return jnp.sqrt(a_next) * x0 + jnp.sqrt(1 - a_next) * eps, None
  x, _ = lax.scan(body, x0, (jnp.asarray(eval_t), f32(cur), f32(abar[ts])))
  return x


SAMPLERS = {'ddpm': ddpm_sample, 'ddim': ddim_sample}


def check_sampler(name: str, steps: int | None, eta: float | None, num_steps: int
                  ) -> dict[str, float | int]:
  """Validates sampler options (ValueError naming the flag); returns {'steps', 'eta'} with
  defaults filled: DDPM runs all T steps with eta 1, DDIM 50 steps (at most T) with eta 0."""
  if name not in SAMPLERS:
    raise ValueError(f'--sampler={name}: unknown sampler (known: {", ".join(sorted(SAMPLERS))})')
  if name == 'ddpm':
    if steps is not None and steps != num_steps:
      raise ValueError(f'--steps={steps}: the ddpm sampler runs all T={num_steps} steps '
                      '(use --sampler=ddim for fewer)')
    if eta is not None and eta != 1.0:
      raise ValueError(f'--eta={eta}: the ddpm sampler is ancestral (eta 1); use --sampler=ddim')
    return {'steps': num_steps, 'eta': 1.0}
  steps = min(50, num_steps) if steps is None else steps
  eta = 0.0 if eta is None else eta
  if not 1 <= steps <= num_steps:
    raise ValueError(f'--steps={steps}: must be in [1, T={num_steps}]')
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f'--eta={eta}: must be in [0, 1]')
  return {'steps': int(steps), 'eta': float(eta)}
