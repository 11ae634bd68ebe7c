"""Diffusion: the forward process and posterior against closed forms, exact conversions, the
samplers (determinism, inversion, DDIM(T, eta=1) = DDPM), guidance, the bound in bits/dim, and a
tiny run through the shared loop (train, checkpoint, resume, sample) with its bad inputs."""

import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from experiments.configs import ddpm_mnist
from models import diffusion as D
from models import unet as unet_lib
from models import upsample
from train import loop
from train import run_loader
from train.errors import UserError
from train.families.diffusion import DiffusionFamily

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir with mnist) is not set')

SCHEDULES = {name: D.GaussianDiffusion(fn(1000)) for name, fn in D.SCHEDULES.items()}


def gaussian_data_denoiser(diffusion, mu, s):
  """The exact eps-prediction E[eps | x_t] when the data is N(mu, s^2) per dimension."""
  def denoise(x, t):
    a = diffusion.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s * s + 1 - a)
  return denoise


def test_nearest_upsampling_repeats_pixels_and_its_gradient_sums_each_block():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  g = rng.normal(size=(2, 6, 8, 5)).astype(np.float32)
  y, vjp = jax.vjp(upsample.upsample_nearest, jnp.asarray(x))
  np.testing.assert_array_equal(y, np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], g.reshape(2, 3, 2, 4, 2, 5).sum((2, 4)),
                             rtol=1e-6)


def test_schedules():
  for name, d in SCHEDULES.items():
    betas = np.asarray(d.betas)
    assert np.all((betas > 0) & (betas < 1)), name
    abar = np.asarray(d.alphas_cumprod)
    assert np.all(np.diff(abar) < 0) and abar[-1] < 1e-3, name
  np.testing.assert_allclose(D.linear_beta_schedule(1000)[[0, -1]], [1e-4, 0.02])
  # Cosine: abar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), Nichol & Dhariwal.
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  t = np.arange(1, 901)
  np.testing.assert_allclose(np.cumprod(1 - D.cosine_beta_schedule(1000))[t - 1],
                             f(t / 1000) / f(0), rtol=1e-9)


@pytest.mark.parametrize('schedule', sorted(SCHEDULES))
def test_forward_samples_match_closed_form(schedule):
  d = SCHEDULES[schedule]
  n = 20000
  x0 = jnp.array([-1.0, -0.3, 0.0, 0.5, 1.0])
  abar = np.cumprod(1 - np.asarray(D.SCHEDULES[schedule](1000)))   # eq. 4, independently
  for i, t in enumerate((0, 10, 250, 500, 999)):
    noise = jax.random.normal(jax.random.key(i), (n, 5))
    xt = np.asarray(d.q_sample(jnp.broadcast_to(x0, (n, 5)), jnp.full((n,), t), noise),
                    np.float64)
    mean, var = np.sqrt(abar[t]) * np.asarray(x0), 1 - abar[t]
    # 5 standard errors: of the mean sqrt(var / n), of the variance var * sqrt(2 / (n - 1)).
    np.testing.assert_array_less(np.abs(xt.mean(0) - mean), 5 * np.sqrt(var / n))
    np.testing.assert_array_less(np.abs(xt.var(0, ddof=1) - var), 5 * var * np.sqrt(2 / (n - 1)))
    m, v, logv = d.q_mean_variance(x0[None], jnp.array([t]))
    np.testing.assert_allclose(m[0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v[0], var, rtol=1e-5)
    np.testing.assert_allclose(logv[0], np.log(var), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('schedule', sorted(SCHEDULES))
def test_posterior_matches_ddpm_formulas(schedule):
  d = SCHEDULES[schedule]
  betas = np.asarray(D.SCHEDULES[schedule](1000), np.float64)
  abar = np.cumprod(1 - betas)
  rng = np.random.default_rng(0)
  x0, xt = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
  t = np.array([1, 2, 10, 300, 700, 999])
  mean, var, logvar = d.q_posterior_mean_variance(jnp.asarray(x0, jnp.float32),
                                                  jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  a, ap, b = abar[t, None], abar[t - 1, None], betas[t, None]
  # DDPM eq. 7.
  want_mean = np.sqrt(ap) * b / (1 - a) * x0 + np.sqrt(1 - b) * (1 - ap) / (1 - a) * xt
  want_var = (1 - ap) / (1 - a) * b
  # The same from Bayes' rule: q(x_{t-1} | x0) = N(sqrt(ap) x0, 1 - ap) times
  # q(x_t | x_{t-1}) = N(sqrt(1 - b) x_{t-1}, b), as a Gaussian in x_{t-1}.
  precision = 1 / (1 - ap) + (1 - b) / b
  bayes_mean = (np.sqrt(ap) * x0 / (1 - ap) + np.sqrt(1 - b) * xt / b) / precision
  for got, want in ((mean, want_mean), (mean, bayes_mean)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(var[:, 0], want_var[:, 0], rtol=2e-5)
  np.testing.assert_allclose(var[:, 0], 1 / precision[:, 0], rtol=2e-5)
  np.testing.assert_allclose(logvar[:, 0], np.log(want_var[:, 0]), rtol=2e-5)


@pytest.mark.parametrize('prediction', D.PREDICTIONS)
def test_x0_eps_v_conversions_are_exact_inverses(prediction):
  d = D.GaussianDiffusion(D.linear_beta_schedule(1000), prediction=prediction)
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(k1, (7, 4, 4, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 50, 400, 800, 990, 999])
  xt = d.q_sample(x0, t, eps)
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  close(d.x0_from_eps(xt, t, eps), x0)
  close(d.eps_from_x0(xt, t, x0), eps)
  v = d.v_from_x0_eps(x0, eps, t)
  close(d.x0_from_v(xt, t, v), x0)
  # The network's target, converted back, gives (x0, eps) whatever the prediction type.
  got_x0, got_eps = d.predict_x0_eps(d.target(x0, eps, t), xt, t)
  close(got_x0, x0)
  close(got_eps, eps)


@pytest.mark.parametrize('prediction', D.PREDICTIONS)
@pytest.mark.parametrize('gamma', [0.0, 5.0])
def test_min_snr_loss_is_the_x0_error_weighted_by_the_clipped_snr(prediction, gamma):
  # Hang et al. 2023, eq. 5-7: whatever the network predicts, the Min-SNR-gamma loss is the
  # squared error of the implied x0 weighted by min(SNR_t, gamma); gamma 0 is the simple loss.
  # Reference: DDPM's linear betas and SNR = abar / (1 - abar) in numpy float64.
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1.0 - betas)
  snr = abar / (1.0 - abar)
  d = D.GaussianDiffusion(D.linear_beta_schedule(1000), prediction=prediction)
  x0 = np.asarray(jax.random.uniform(jax.random.key(1), (64, 4, 4, 1), minval=-1, maxval=1))
  seen = {}

  def network(x_t, t):   # any x0 guess (here 0.7 x_t), expressed as the prediction's target
    xt, tt = np.asarray(x_t, np.float64), np.asarray(t)
    seen.update(t=tt)
    a = abar[tt].reshape(-1, 1, 1, 1)
    x0_hat = 0.7 * xt
    eps_hat = (xt - np.sqrt(a) * x0_hat) / np.sqrt(1 - a)
    out = {'x0': x0_hat, 'eps': eps_hat,
           'v': np.sqrt(a) * eps_hat - np.sqrt(1 - a) * x0_hat}[prediction]
    seen.update(x0_error=((x0_hat - x0) ** 2).mean(axis=(1, 2, 3)))
    return jnp.asarray(out, jnp.float32)

  got = np.asarray(d.training_losses(network, jnp.asarray(x0), jax.random.key(2),
                                     min_snr_gamma=gamma))
  t = seen['t']
  assert len(set(t.tolist())) > 30   # many t, on both sides of SNR = 5 (the clip does work)
  assert (snr[t] > 5.0).any() and (snr[t] < 5.0).any()
  # The simple loss weighs the x0 error by SNR (eps), 1 (x0) or SNR + 1 (v).
  weight = (np.minimum(snr[t], gamma) if gamma else
            {'eps': snr[t], 'x0': np.ones_like(t), 'v': snr[t] + 1}[prediction])
  np.testing.assert_allclose(got, weight * seen['x0_error'], rtol=2e-3)


def test_ddim_eta0_is_deterministic_and_inverts():
  d = SCHEDULES['cosine']
  denoise = gaussian_data_denoiser(d, 0.3, 0.5)
  x_T = jax.random.normal(jax.random.key(0), (256, 4))
  sample = jax.jit(lambda x, k, steps: D.ddim_sample(d, denoise, x, k, steps=steps, eta=0.0,
                                                     clip=False), static_argnums=2)
  a, b = sample(x_T, jax.random.key(1), 50), sample(x_T, jax.random.key(2), 50)
  np.testing.assert_array_equal(a, b)   # noise keys do not matter at eta 0
  x0 = 0.3 + 0.5 * jax.random.normal(jax.random.key(3), (256, 4))
  errors = []
  for steps in (20, 100):
    x_T = D.ddim_encode(d, denoise, x0, steps=steps)
    assert abs(float(x_T.std()) - 1.0) < 0.05   # encodes onto the prior
    errors.append(float(jnp.abs(sample(x_T, jax.random.key(4), steps) - x0).mean()))
  assert errors[1] < 0.02 and errors[1] < errors[0] / 2, errors


def test_ddim_all_steps_eta1_matches_ddpm():
  d = SCHEDULES['cosine']
  mu, s = 0.3, 0.5
  denoise = gaussian_data_denoiser(d, mu, s)
  n = 8192
  ddpm = jax.jit(lambda x, k: D.ddpm_sample(d, denoise, x, k, clip=False))
  ddim = jax.jit(lambda x, k: D.ddim_sample(d, denoise, x, k, steps=1000, eta=1.0, clip=False))
  x_T = lambda i: jax.random.normal(jax.random.key(i), (n, 2))
  a = np.asarray(ddpm(x_T(0), jax.random.key(1)), np.float64).ravel()
  b = np.asarray(ddim(x_T(2), jax.random.key(3)), np.float64).ravel()
  m = a.size
  # Independent runs: same mean and variance within 5 standard errors of their difference,
  # both at the data's N(mu, s^2).
  assert abs(a.mean() - b.mean()) < 5 * math.sqrt(2 * s * s / m)
  assert abs(a.var() - b.var()) < 5 * s * s * math.sqrt(4 / (m - 1))
  for x in (a, b):
    assert abs(x.mean() - mu) < 5 * s / math.sqrt(m)
    assert abs(x.var() - s * s) < 5 * s * s * math.sqrt(2 / (m - 1))
  # With the same noise the two chains are the same chain (sigma_t^2 = beta-tilde_t).
  np.testing.assert_allclose(ddim(x_T(0), jax.random.key(1)), a.reshape(n, 2), atol=1e-4)


def _random_unet(num_classes=10, shape=(8, 8, 1), **kw):
  """(graphdef, state) of a small UNet with every param random (a fresh one outputs zeros: its
  last conv starts at zero). Params come from numpy: compiling the initializers takes longer."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: unet_lib.UNet(
      image_shape=shape, channels=8, channel_mult=(1, 2), attention_resolutions=(4,), groups=4,
      num_classes=num_classes, rngs=nnx.Rngs(0), **kw)))
  leaves, tree = jax.tree.flatten(abstract)
  rng = np.random.default_rng(0)
  return graphdef, tree.unflatten([jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
                                   for x in leaves])


def _group_norm_forms(model) -> list[str]:
  """The `sums` of every `models.unet.GroupNorm` in `model`."""
  return [m.sums for _, m in nnx.iter_graph(model) if isinstance(m, unet_lib.GroupNorm)]


def test_unet_dropout_bits_change_the_masks_and_nothing_else():
  """`dropout_bits` adds no param and changes no output without a dropout key; with one, 8-bit
  masks are other masks than bernoulli's, reproducible from the key."""
  (g32, s32), (g8, s8) = (_random_unet(dropout=0.3, dropout_bits=b) for b in (32, 8))
  jax.tree.map(np.testing.assert_array_equal, s32, s8)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t, y = jnp.array([5, 700]), jnp.array([3, 1])
  run = lambda g, key: nnx.merge(g, s32)(x, t, y, dropout_key=key)
  np.testing.assert_array_equal(run(g32, None), run(g8, None))
  a = run(g8, jax.random.key(1))
  np.testing.assert_array_equal(a, run(g8, jax.random.key(1)))
  assert float(jnp.abs(a - run(g8, None)).max()) > 1e-3
  assert float(jnp.abs(a - run(g32, jax.random.key(1))).max()) > 1e-3
  with pytest.raises(ValueError, match='dropout_bits=4'):
    _random_unet(dropout_bits=4)


@pytest.mark.parametrize('shape,groups', [((3, 5, 4, 12), 4), ((2, 3, 3, 8), 8)])
def test_group_norm_dots_equals_flax_group_norm_and_its_autodiff(shape, groups):
  """`group_norm_dots` (batched-dot sums, a hand-written backward) against flax's
  `nnx.GroupNorm` and JAX's autodiff of it: output, dx, d scale and d bias."""
  keys = jax.random.split(jax.random.key(sum(shape)), 4)
  x = 3.0 * jax.random.normal(keys[0], shape) + 1.5
  dy = jax.random.normal(keys[1], shape)
  norm = nnx.GroupNorm(shape[-1], num_groups=groups, rngs=nnx.Rngs(0))
  norm.scale[...] = jax.random.normal(keys[2], norm.scale.shape)
  norm.bias[...] = jax.random.normal(keys[3], norm.bias.shape)
  graphdef, state = nnx.split(norm)
  want, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  d_state, want_dx = vjp(dy)
  got, vjp = jax.vjp(lambda p, x: unet_lib.group_norm_dots(x, *p, groups, norm.epsilon),
                     (norm.scale[...], norm.bias[...]), x)
  (d_scale, d_bias), dx = vjp(dy)
  for a, b in ((got, want), (dx, want_dx), (d_scale, d_state['scale'][...]),
               (d_bias, d_state['bias'][...])):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert float(jnp.abs(a - b).max() / jnp.abs(b).max()) < 1e-5


def test_unet_group_norm_sums_change_no_param_and_only_rounding():
  """`group_norm_sums='dot'` builds the same param tree as flax's GroupNorms, and with the same
  params gives the same output and gradients up to float rounding."""
  (g_reduce, state), (g_dot, state_dot) = (_random_unet(group_norm_sums=s)
                                           for s in ('reduce', 'dot'))
  jax.tree.map(np.testing.assert_array_equal, state, state_dot)
  assert _group_norm_forms(nnx.merge(g_dot, state)).count('dot') >= 5
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t, y = jnp.array([5, 700]), jnp.array([3, 1])
  loss = lambda g: lambda s: jnp.sum(nnx.merge(g, s)(x, t, y) ** 2)
  (want, want_grads), (got, grads) = (jax.value_and_grad(loss(g))(state)
                                      for g in (g_reduce, g_dot))
  # The dot UNet runs group_norm_dots (its custom VJP), the other flax's code.
  jaxprs = [str(jax.make_jaxpr(loss(g))(state)) for g in (g_reduce, g_dot)]
  assert 'custom_vjp_call' not in jaxprs[0] and 'custom_vjp_call' in jaxprs[1]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()))
  with pytest.raises(ValueError, match="group_norm_sums='sum'"):
    _random_unet(group_norm_sums='sum')
  config = ddpm_mnist.get_config('tiny')
  config.model.group_norm_sums = 'sum'
  with pytest.raises(UserError, match="config.model.group_norm_sums='sum': must be one of"):
    DiffusionFamily(config)


def test_with_group_norm_sums_switches_a_built_unet_and_leaves_it_alone():
  """A UNet built with one form and switched to the other (what `train.sample
  --group_norm_sums` does to a trained run) computes what a UNet built with that form computes,
  bit for bit, over the same params; the model it was made from is unchanged."""
  (g_reduce, state), (g_dot, _) = (_random_unet(group_norm_sums=s) for s in ('reduce', 'dot'))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t, y = jnp.array([5, 700]), jnp.array([3, 1])
  run = jax.jit(lambda g, s: nnx.merge(g, s)(x, t, y), static_argnums=0)
  want_reduce, want_dot = run(g_reduce, state), run(g_dot, state)
  assert float(jnp.abs(want_dot - want_reduce).max()) > 0   # the two forms round differently
  model = nnx.merge(g_reduce, state)
  switched = unet_lib.with_group_norm_sums(model, 'dot')
  assert set(_group_norm_forms(model)) == {'reduce'}
  assert set(_group_norm_forms(switched)) == {'dot'}
  jax.tree.map(np.testing.assert_array_equal, nnx.state(switched), state)
  np.testing.assert_array_equal(run(*nnx.split(switched)), want_dot)
  np.testing.assert_array_equal(run(*nnx.split(model)), want_reduce)
  back = unet_lib.with_group_norm_sums(switched, 'reduce')
  np.testing.assert_array_equal(run(*nnx.split(back)), want_reduce)
  with pytest.raises(ValueError, match="group_norm_sums='sum'"):
    unet_lib.with_group_norm_sums(model, 'sum')


def test_guidance_scales():
  graphdef, state = _random_unet()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  t = jnp.array([0, 10, 500, 999])
  y = jnp.array([3, 1, 4, 1])
  fn = jax.jit(lambda x, t, y: nnx.merge(graphdef, state)(x, t, y))
  cond, uncond = fn(x, t, y), fn(x, t, jnp.full_like(y, 10))
  assert float(jnp.abs(cond - uncond).max()) > 1e-3
  np.testing.assert_array_equal(D.guided(fn, y, 10, 0.0)(x, t), uncond)
  np.testing.assert_array_equal(D.guided(fn, y, 10, 1.0)(x, t), cond)
  # Other scales run one doubled batch (conditional + null labels) through the network.
  np.testing.assert_allclose(D.guided(fn, y, 10, 2.5)(x, t), uncond + 2.5 * (cond - uncond),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(D.guided(fn, y, 10, 1e-9)(x, t), uncond, rtol=1e-4, atol=1e-5)


def test_discretized_likelihood_is_a_distribution_over_the_256_values():
  values = jnp.arange(256) / 127.5 - 1.0
  for mean, log_scale in ((0.0, -1.0), (0.9, -4.0), (-0.2, 0.5)):
    logp = D.discretized_gaussian_log_likelihood(values, mean, log_scale)
    np.testing.assert_allclose(float(jnp.exp(logp).sum()), 1.0, rtol=1e-4)


def test_bits_per_dim_true_noise_model_beats_random_model():
  d = D.GaussianDiffusion(D.linear_beta_schedule(200))
  u8 = jax.random.randint(jax.random.key(0), (4, 8, 8, 1), 0, 256)
  x0 = (u8 / 127.5 - 1.0).astype(jnp.float32)
  oracle = lambda x, t: d.eps_from_x0(x, t, x0)   # predicts the very noise that made x_t
  graphdef, state = _random_unet(num_classes=0)
  random_model = lambda x, t: nnx.merge(graphdef, state)(x, t)
  key = jax.random.key(1)
  good = jax.jit(lambda: d.bpd(oracle, x0, key))()
  bad = jax.jit(lambda: d.bpd(random_model, x0, key))()
  assert np.all(np.isfinite(good)) and np.all(np.isfinite(bad))
  assert np.all(good < bad), (good, bad)
  # With the true noise every KL term vanishes: the bound is the prior plus the decoder term.
  zero = jnp.zeros((4,), jnp.int32)
  decoder = d.vlb_term_bpd(oracle, x0, zero, jax.random.normal(jax.random.key(2), x0.shape))
  np.testing.assert_allclose(good, d.prior_bpd(x0) + decoder, rtol=1e-3, atol=1e-3)


def test_last_term_of_the_cosine_bound_amplifies_eps_errors_unless_x0_is_clipped():
  # beta_{T-1} is clipped at 0.999, so alpha = 0.001: an eps error e moves the reverse mean by
  # about e / sqrt(alpha) ~ 32 e, a KL of ~500 e^2 nats per dimension (DDPM eq. 12's weight).
  d = SCHEDULES['cosine']
  x0 = (jax.random.randint(jax.random.key(0), (2, 4, 4, 1), 0, 256) / 127.5 - 1.0)
  x0 = x0.astype(jnp.float32)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  err = 0.05
  denoise = lambda x, t: d.eps_from_x0(x, t, x0) + err
  last = jnp.full((2,), d.num_steps - 1, jnp.int32)
  beta = float(d.betas[-1])
  expected_nats = beta ** 2 / (1 - beta) * err ** 2 / (2 * float(d.posterior_variance[-1]))
  np.testing.assert_allclose(d.vlb_term_bpd(denoise, x0, last, noise) * math.log(2),
                             expected_nats, rtol=2e-2)
  # Clipped x0 (what the samplers use) bounds the mean's error by 2 * coef_x0 ~ 3e-3.
  assert np.all(np.asarray(d.vlb_term_bpd(denoise, x0, last, noise, clip=True)) < 1e-3)


# ---- the bound against an independent reference on a tiny UNet ----
BOUND_T = 20   # a short chain: the full sum is 20 network calls


def reference_bound(betas, denoise, x0, noise, clip):
  """The variational bound (DDPM eq. 5) of uint8-grid images x0 [B, H, W, C], written out here
  in float64 numpy from the closed forms, not with models/diffusion.py: returns ([T, B] terms
  L_0 .. L_{T-1} in bits/dim, with term t's noise noise[t], and the [B] prior L_T).

  Reverse model: eps-prediction, variance beta-tilde (eq. 7), x0 clipped to [-1, 1] with
  `clip`; the decoder's variance is beta-tilde_1, since beta-tilde_0 = 0 (improved-diffusion's
  convention for the fixed small variance).
  """
  betas = np.asarray(betas, np.float64)
  abar = np.cumprod(1.0 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  tilde = betas * (1.0 - abar_prev) / (1.0 - abar)
  x0 = np.asarray(x0, np.float64)
  per_image = lambda a: a.reshape(len(a), -1).mean(1) / math.log(2.0)
  terms = []
  for t in range(len(betas)):
    x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1.0 - abar[t]) * noise[t]     # eq. 4
    eps = np.asarray(denoise(jnp.asarray(x_t, jnp.float32),
                             jnp.full((len(x0),), t, jnp.int32)), np.float64)
    x0_hat = (x_t - math.sqrt(1.0 - abar[t]) * eps) / math.sqrt(abar[t])
    if clip:
      x0_hat = np.clip(x0_hat, -1.0, 1.0)
    coef_x0 = betas[t] * math.sqrt(abar_prev[t]) / (1.0 - abar[t])          # eq. 7
    coef_xt = (1.0 - abar_prev[t]) * math.sqrt(1.0 - betas[t]) / (1.0 - abar[t])
    if t > 0:
      # q(x_{t-1} | x_t, x0) and p(x_{t-1} | x_t) share the variance beta-tilde_t: the KL of two
      # Gaussians is then the squared mean difference over twice it (eq. 12's form).
      terms.append(per_image((coef_x0 * (x0 - x0_hat)) ** 2 / (2.0 * tilde[t])))
    else:
      # The decoder (section 3.3): N(mean, beta-tilde_1) integrated over the pixel's bin of
      # width 2/255; the end bins reach to -inf and +inf.
      mean = coef_x0 * x0_hat + coef_xt * x_t
      std = math.sqrt(tilde[1])
      upper = np.where(x0 > 0.999, 1.0, stats.norm.cdf((x0 + 1 / 255 - mean) / std))
      lower = np.where(x0 < -0.999, 0.0, stats.norm.cdf((x0 - 1 / 255 - mean) / std))
      terms.append(per_image(-np.log(upper - lower)))
  # KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)).
  prior = 0.5 * (abar[-1] * x0 ** 2 + (1.0 - abar[-1]) - 1.0 - np.log(1.0 - abar[-1]))
  return np.stack(terms), per_image(prior)


@pytest.fixture(scope='module')
def tiny_bound():
  """(process, jitted random tiny UNet as eps-denoiser, [3, 8, 8, 1] images on the 8-bit grid,
  and the reference bound with x0 clipped: ([T, 3 * 256] terms, [3 * 256] prior) at 256 noise
  draws per image, the images tiled as `np.tile` does)."""
  diffusion = D.GaussianDiffusion(D.cosine_beta_schedule(BOUND_T))
  graphdef, state = _random_unet(num_classes=0)
  net = jax.jit(lambda x, t: nnx.merge(graphdef, state)(x, t))
  u8 = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1))
  x0 = (u8 / 127.5 - 1.0).astype(np.float32)
  draws = 256
  noise = np.random.default_rng(2).standard_normal((BOUND_T, 3 * draws) + x0.shape[1:])
  clipped = reference_bound(D.cosine_beta_schedule(BOUND_T), net, np.tile(x0, (draws, 1, 1, 1)),
                            noise, clip=True)
  return diffusion, net, x0, clipped


@pytest.mark.parametrize('clip', [False, True])
def test_bound_terms_match_the_closed_forms(tiny_bound, clip):
  d, net, x0, _ = tiny_bound
  noise = np.random.default_rng(1).standard_normal((BOUND_T,) + x0.shape)
  want_terms, want_prior = reference_bound(D.cosine_beta_schedule(BOUND_T), net, x0, noise,
                                           clip)
  term = jax.jit(lambda t, noise: d.vlb_term_bpd(net, jnp.asarray(x0), t, noise, clip))
  got = np.stack([term(jnp.full((3,), t, jnp.int32), jnp.asarray(noise[t], jnp.float32))
                  for t in range(BOUND_T)])
  # float32 against float64; the decoder's normal CDF is tanh-approximated (improved-diffusion).
  np.testing.assert_allclose(got[1:], want_terms[1:], rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(got[0], want_terms[0], rtol=1e-2)
  np.testing.assert_allclose(d.prior_bpd(jnp.asarray(x0)), want_prior, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('estimator', [
    dict(exact_steps=0, stratified=False), dict(exact_steps=3, stratified=False),
    dict(exact_steps=0, stratified=True), dict(exact_steps=2, stratified=True), 'full'])
def test_bits_per_dim_estimators_are_unbiased_for_the_full_bound(tiny_bound, estimator):
  # Each estimator (one t per image, possibly stratified, the first terms exact; or every term
  # at one noise draw) on many copies of 3 images, against the mean of the reference full sum
  # over 256 noise draws: equal within 4 standard errors. With x0 clipped, as the samplers
  # and train.evaluate do: unclipped, this random UNet's last term (~1000 bits/dim, see
  # test_last_term_of_the_cosine_bound_amplifies_eps_errors_unless_x0_is_clipped) would swamp
  # the comparison in noise.
  d, net, x0, (terms, prior) = tiny_bound
  # The full sum varies far less than the one-t estimates: fewer copies suffice.
  x = jnp.asarray(np.tile(x0, (256 if estimator == 'full' else 2048, 1, 1, 1)))
  if estimator == 'full':
    got = jax.jit(lambda k: d.bpd(net, x, k, clip=True))(jax.random.key(1))
  else:
    got = jax.jit(lambda k: d.bpd_estimate(net, x, k, clip=True, **estimator))(jax.random.key(1))
  got = np.asarray(got, np.float64)
  want = terms.sum(0) + prior
  stderr = math.sqrt(got.var() / len(got) + want.var() / len(want))
  assert abs(got.mean() - want.mean()) < 4 * stderr, (got.mean(), want.mean(), stderr)
  # Sharp enough to matter: dropping the decoder term, the largest, would be caught.
  assert terms[0].mean() > 10 * stderr, (terms[0].mean(), stderr)


def test_sampler_options_are_checked():
  for name, steps, eta, fragment in (('euler', None, None, '--sampler=euler: unknown sampler'),
                                     ('ddim', 0, 0.0, '--steps=0'),
                                     ('ddim', 1001, 0.0, '--steps=1001'),
                                     ('ddim', 50, 1.5, '--eta=1.5'),
                                     ('ddim', 50, -0.1, '--eta=-0.1'),
                                     ('ddpm', 50, None, '--steps=50')):
    with pytest.raises(ValueError, match=fragment.replace('[', r'\[')):
      D.check_sampler(name, steps, eta, 1000)
  assert D.check_sampler('ddim', None, None, 1000) == {'steps': 50, 'eta': 0.0}
  assert D.check_sampler('ddpm', None, None, 1000) == {'steps': 1000, 'eta': 1.0}
  np.testing.assert_array_equal(D.ddim_timesteps(1000, 4), [999, 749, 499, 249])
  np.testing.assert_array_equal(D.ddim_timesteps(10, 10), np.arange(9, -1, -1))


def test_model_value_errors_reach_the_command_line_as_user_errors():
  config = ddpm_mnist.get_config('tiny')
  config.diffusion.schedule = 'cubic'
  with pytest.raises(UserError, match="config.diffusion.schedule='cubic'"):
    DiffusionFamily(config)
  config = ddpm_mnist.get_config('tiny')
  config.diffusion.min_snr_gamma = -1.0
  with pytest.raises(UserError, match='config.diffusion.min_snr_gamma=-1.0: must be >= 0'):
    DiffusionFamily(config)
  family = DiffusionFamily(ddpm_mnist.get_config('tiny'))
  family.load_metadata({'image_shape': [28, 28, 1], 'class_names': [str(i) for i in range(10)]})
  with pytest.raises(UserError, match='--sampler=euler: unknown sampler'):
    family.check_sample_options({'sampler': 'euler'})


def test_guidance_on_an_unconditional_model_is_an_error():
  family = DiffusionFamily(ddpm_mnist.get_config('tiny'))
  family.load_metadata({'image_shape': [28, 28, 1], 'class_names': [str(i) for i in range(10)]})
  with pytest.raises(UserError, match='--guidance=2.0: this model is unconditional'):
    family.check_sample_options({'guidance': 2.0})
  assert family.check_sample_options({}) == {'sampler': 'ddim', 'steps': 10, 'eta': 0.0}


# ---- end to end through the shared loop ----
def _run(*args):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


@needs_tfds
def test_train_checkpoint_resume_sample(tmp_path, monkeypatch):
  config = ddpm_mnist.get_config('cond,tiny')
  config.update_from_flattened_dict({'total_steps': 6, 'checkpoint_every': 3, 'eval_every': 3,
                                     'log_every': 1})
  one = jax.devices()[:1]
  straight = str(tmp_path / 'straight')
  result = loop.train(config, straight, devices=one)
  assert sorted(os.listdir(os.path.join(straight, 'checkpoints'))) == ['3', '6']
  assert os.listdir(os.path.join(straight, 'samples')) == ['step_0000006.png']
  bpd = 'eval/vlb_bits_per_dim_estimate'
  evals = [r for r in result.history if 'eval_ema/vlb_bits_per_dim_estimate' in r]
  assert [r['step'] for r in evals] == [3, 6]
  assert all(math.isfinite(r[bpd]) and r[bpd] > 0 for r in evals)
  assert all(0 < r[bpd + '_stderr'] < r[bpd] for r in evals)
  assert not any(k.endswith('_sq') for r in evals for k in r)

  # Resume from step 3 (as if the run had stopped there): the same steps, bit for bit.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  again = loop.train(config, resumed, devices=one)
  assert sorted(again.step_losses) == [4, 5, 6]
  assert all(again.step_losses[s] == result.step_losses[s] for s in (4, 5, 6))
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(same, jax.device_get(again.state['params']), jax.device_get(result.state['params']))
  jax.tree.map(same, jax.device_get(again.state['ema']), jax.device_get(result.state['ema']))

  # train.sample: a bad option is one line and exit 1 (before anything compiles).
  proc = _run('train.sample', f'--workdir={resumed}', '--sampler=euler')
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert errors == ['error: --sampler=euler: unknown sampler (known: ddim, ddpm)'], proc.stderr

  family, models, step = run_loader.load_models(resumed)
  assert step == 6 and family.conditional
  for options, fragment in (({'steps': 0}, '--steps=0'), ({'steps': 101}, '--steps=101'),
                            ({'eta': 1.5}, '--eta=1.5'), ({'labels': '10'}, 'label 10 is outside'),
                            ({'guidance': -1.0}, '--guidance=-1.0'),
                            ({'group_norm_sums': 'sum'}, '--group_norm_sums=sum: must be one of')):
    with pytest.raises(UserError, match=fragment):
      family.sample(models, jax.random.key(0), str(tmp_path), dict(options))
  # What train.sample runs, in-process (a second process would compile it all again).
  out = str(tmp_path / 'grid.png')
  text = family.sample(models, jax.random.key(0), resumed, dict(
      sampler='ddim', steps=5, eta=0.5, guidance=2.0, labels='all', num_samples=10, out=out))
  assert text == f'wrote 10 samples to {out}' and os.path.isfile(out)
  # The same seed gives the same images; DDPM runs all T = 100 steps.
  gen = lambda seed, **kw: family.generate_images(
      models, jax.random.key(seed), 3, np.array([1, 2, 3]), **family.check_sample_options(kw))
  np.testing.assert_array_equal(gen(0), gen(0))
  assert not np.array_equal(gen(0), gen(1))
  # Sampling a 'reduce' run with the dot GroupNorms: the same images up to float rounding, and
  # the loaded model is left as trained.
  assert family.group_norm_sums == 'reduce'
  switches, switch = [], unet_lib.with_group_norm_sums
  monkeypatch.setattr(unet_lib, 'with_group_norm_sums',
                      lambda model, sums: switches.append(sums) or switch(model, sums))
  dot = gen(0, group_norm_sums='dot')
  assert switches == ['dot']
  assert np.abs(dot.astype(np.int32) - gen(0)).max() <= 1
  assert set(_group_norm_forms(models['model'])) == {'reduce'}
  ddpm = gen(0, sampler='ddpm')
  assert ddpm.shape == (3, 28, 28, 1) and ddpm.dtype == np.uint8
  # train.evaluate's likelihood: the full bound on vlb_images (2) images, the estimate on all.
  metrics = family.likelihood_metrics(models, jax.random.key(0), ddpm, np.array([1, 2, 3]))
  assert metrics['vlb_images'] == 2 and metrics['vlb_exact_steps'] == 4
  for k in ('vlb_bits_per_dim', 'vlb_bits_per_dim_estimate'):
    assert 0 < metrics[k] < np.inf and 0 < metrics[k + '_stderr'] < np.inf
    assert k in family.likelihood_descriptions()
  # The full bound, summed in chunks of timesteps with a progress line, is the model's `bpd`.
  x0, labels = ddpm[:2].astype(np.float32) / 127.5 - 1.0, jnp.array([1, 2])
  model = models['model']
  reference = family.diffusion.bpd(lambda x, t: model(x, t, labels), jnp.asarray(x0),
                                   jax.random.split(jax.random.key(0))[1], clip=True)
  np.testing.assert_allclose(metrics['vlb_bits_per_dim'], float(reference.mean()), rtol=1e-4)
