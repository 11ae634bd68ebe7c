"""The VAE: reparameterisation, analytic KL, the importance-weighted bound, training through the
shared loop (resume, data parallel), and its bad-input errors."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import vae_mnist
from models import vae as vae_lib
from tests.test_cli import ROOT, assert_one_line_error, run
from train import data as data_lib
from train import families
from train import loop
from train import run_loader
from train.errors import UserError

needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')
CONFIG = os.path.join(ROOT, 'experiments/configs/vae_mnist.py')

MEAN = jnp.array([[0.5, -2.0, 3.0]])
LOG_VAR = jnp.array([[0.0, math.log(0.25), math.log(4.0)]])


def test_reparameterised_sample_has_the_posterior_mean_and_variance():
  n = 400_000
  z = np.asarray(vae_lib.reparameterize(MEAN, LOG_VAR, jax.random.key(0), num=n))[:, 0]
  var = np.exp(np.asarray(LOG_VAR[0]))
  # Tolerances: 5 standard errors of the sample mean and of the sample variance.
  np.testing.assert_allclose(z.mean(0), MEAN[0], atol=5 * np.sqrt(var / n).max())
  np.testing.assert_allclose(z.var(0), var, atol=5 * np.sqrt(2 * var**2 / n).max())


def test_analytic_kl_equals_monte_carlo():
  n = 400_000
  z = vae_lib.reparameterize(MEAN, LOG_VAR, jax.random.key(1), num=n)
  log_ratio = np.asarray(vae_lib.diag_gaussian_log_prob(z, MEAN, LOG_VAR)
                         - vae_lib.standard_normal_log_prob(z))[:, 0]
  kl = float(vae_lib.gaussian_kl(MEAN, LOG_VAR)[0])
  assert kl > 1.0
  assert abs(log_ratio.mean() - kl) < 5 * log_ratio.std() / math.sqrt(n)
  # Exact at q = p.
  assert float(vae_lib.gaussian_kl(jnp.zeros((1, 4)), jnp.zeros((1, 4)))[0]) == 0.0


def test_iwae_bound_is_above_the_elbo_and_tightens_with_k():
  vae = vae_lib.VAE(image_shape=(4, 4, 1), latent_dim=3, hidden=(16,), rngs=nnx.Rngs(0))
  x = jax.random.bernoulli(jax.random.key(2), 0.3, (64, 4, 4, 1)).astype(jnp.float32)
  mean, log_var = vae.encode(x)
  # The ELBO with analytic KL, its reconstruction term averaged over 4000 posterior samples.
  z = vae_lib.reparameterize(mean, log_var, jax.random.key(3), num=4000)
  elbo = float(jnp.mean(vae.log_likelihood(x, vae.decode(z)).mean(0)
                        - vae_lib.gaussian_kl(mean, log_var)))
  bound = lambda x, k, chunk=100: float(jnp.mean(bound_fn(vae, x, jax.random.key(4), k, chunk)))
  b1 = bound(jnp.tile(x, (200, 1, 1, 1)), 1)  # 200 one-sample bounds of each image
  b10, b100, b1000 = bound(x, 10), bound(x, 100), bound(x, 1000, chunk=300)  # 1000: ragged chunks
  assert abs(b1 - elbo) < 0.05, (b1, elbo)   # k = 1 is the ELBO in expectation
  assert elbo + 0.05 < b10 < b100 < b1000, (elbo, b10, b100, b1000)
  with pytest.raises(ValueError, match='k >= 1'):
    vae_lib.iwae_bound(vae, x, None, jax.random.key(0), 0)


@nnx.jit(static_argnums=(3, 4))
def bound_fn(vae, x, key, k, chunk):
  return vae_lib.iwae_bound(vae, x, None, key, k, chunk)


def tiny_config(**overrides):
  c = vae_mnist.get_config('iwae,tiny')
  c.update_from_flattened_dict({'log_every': 5, 'eval_every': 0, 'checkpoint_every': 0,
                                **overrides})
  return c


@needs_tfds
def test_trains_on_mnist_resumes_exactly_and_writes_pictures(tmp_path):
  full = loop.train(tiny_config(), str(tmp_path / 'full'), devices=jax.devices()[:1])
  losses = full.step_losses
  assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 20
  workdir = str(tmp_path / 'resumed')
  loop.train(tiny_config(total_steps=12), workdir, devices=jax.devices()[:1])
  second = loop.train(tiny_config(), workdir, devices=jax.devices()[:1])
  assert sorted(second.step_losses) == list(range(13, 31))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state),
               jax.device_get(full.state))
  assert sorted(os.listdir(tmp_path / 'full/samples')) == [
      'step_0000030.png', 'step_0000030_interp.png', 'step_0000030_recon.png']

  # The test NLL: an IWAE estimate on fixed-seed binarised test images, tighter with k.
  family, models, _ = run_loader.load_models(str(tmp_path / 'full'))
  family.setup_data(0, 1)
  assert set(np.unique(family.eval_batches()[0]['image'])) == {0, 255}
  images = data_lib.load_images('mnist')['test'][0][:64]
  nll = lambda k: family.likelihood_metrics(models, jax.random.key(0), images, None,
                                            iwae_samples=k)['iwae_nll_nats']
  assert 0 < nll(64) < nll(1)
  with pytest.raises(UserError, match='iwae_samples=0'):
    family.likelihood_metrics(models, jax.random.key(0), images, None, iwae_samples=0)


@needs_tfds
def test_data_parallel_equals_single_device(tmp_path):
  assert jax.device_count() == 8
  sgd = {'optimizer.name': 'sgd', 'optimizer.schedule': 'constant', 'optimizer.lr': 0.01,
         'total_steps': 4, 'log_every': 1}
  single = loop.train(tiny_config(**sgd), str(tmp_path / 'single'), devices=jax.devices()[:1])
  dp = loop.train(tiny_config(**sgd), str(tmp_path / 'dp'))
  losses = lambda r: [r.step_losses[s] for s in range(1, 5)]
  assert losses(single)[3] < losses(single)[0] - 1.0
  np.testing.assert_allclose(losses(dp), losses(single), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(dp.state['params']), jax.device_get(single.state['params']))


@needs_tfds
def test_bad_inputs_are_one_line(tmp_path):
  train = lambda *a: run('train', f'--config={CONFIG}:iwae,tiny', f'--workdir={tmp_path}', *a)
  assert_one_line_error(train('--config.iwae_samples=0'), 'iwae_samples=0', 'k >= 1')
  assert_one_line_error(train('--config.data.binarize=none'),
                        'likelihood=bernoulli needs binary pixels', 'binarize=dynamic')
  with pytest.raises(UserError, match='model.likelihood'):
    families.get('vae')(tiny_config(**{'model.likelihood': 'poisson'}))
