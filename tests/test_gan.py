"""The GAN: losses and the R1 penalty, the two halves of its one jitted step (which network each
half changes, and that the generator trains against the updated discriminator), training through
the shared loop (resume, data parallel, samples) and bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import gan_mnist
from models import gan as gan_lib
from tests.test_cli import ROOT, assert_one_line_error, run
from train import families
from train import loop
from train.errors import UserError
from train.family import StepContext

needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')
CONFIG = os.path.join(ROOT, 'experiments/configs/gan_mnist.py')
SGD = {'optimizer.name': 'sgd', 'optimizer.schedule': 'constant', 'optimizer.lr': 0.05,
       'optimizer_d.name': 'sgd', 'optimizer_d.schedule': 'constant', 'optimizer_d.lr': 0.05}


def tiny_config(arg='tiny', **overrides):
  c = gan_mnist.get_config(arg)
  c.update_from_flattened_dict(overrides)
  return c


def test_losses_and_r1_penalty():
  zero = jnp.zeros(4)
  ns, hinge = 'non_saturating', 'hinge'
  # At D = 1/2 everywhere: -log(1/2) - log(1/2) and -log(1/2); hinge: 1 + 1 and 0.
  np.testing.assert_allclose(gan_lib.discriminator_loss(ns, zero, zero), 2 * np.log(2), rtol=1e-6)
  np.testing.assert_allclose(gan_lib.generator_loss(ns, zero), np.log(2), rtol=1e-6)
  assert float(gan_lib.discriminator_loss(hinge, zero, zero)) == 2.0
  # Confident and right: hinge is exactly 0 beyond the margin, non-saturating tends to 0.
  assert float(gan_lib.discriminator_loss(hinge, zero + 3, zero - 3)) == 0.0
  assert float(gan_lib.discriminator_loss(ns, zero + 20, zero - 20)) < 1e-8
  assert float(gan_lib.generator_loss(hinge, zero + 2.5)) == -2.5
  with pytest.raises(ValueError, match='unknown GAN loss'):
    gan_lib.generator_loss('wasserstein', zero)
  # A linear discriminator <w, x> has gradient w everywhere: R1 = ||w||^2 for every image.
  w = jax.random.normal(jax.random.key(0), (5, 5, 1))
  linear = lambda x, labels: jnp.sum(x * w, axis=(1, 2, 3))
  real = jax.random.normal(jax.random.key(1), (3, 5, 5, 1))
  np.testing.assert_allclose(gan_lib.r1_penalty(linear, real), [jnp.sum(w**2)] * 3, rtol=1e-5)


def test_pixel_norm_and_the_optional_refining_convs():
  x = np.random.default_rng(0).normal(size=(2, 3, 3, 5)).astype(np.float32)
  normed = np.asarray(gan_lib.pixel_norm(jnp.asarray(x)))
  np.testing.assert_allclose(normed, x / np.sqrt(np.mean(x ** 2, -1, keepdims=True)), rtol=1e-5)
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  shape, c = (28, 28, 1), 8
  plain = gan_lib.Generator(image_shape=shape, z_dim=4, channels=c, rngs=nnx.Rngs(0))
  deep = gan_lib.Generator(image_shape=shape, z_dim=4, channels=c, refine=1, norm='pixel',
                           rngs=nnx.Rngs(0))
  # One 3x3 conv (with bias) at 2c channels (7x7) and one at c channels (14x14).
  assert count(deep) - count(plain) == (9 * (2 * c) ** 2 + 2 * c) + (9 * c ** 2 + c)
  images = deep(jnp.ones((3, 4)))
  assert images.shape == (3, 28, 28, 1) and float(jnp.abs(images).max()) <= 1.0
  d = gan_lib.Discriminator(image_shape=shape, channels=c, refine=2, rngs=nnx.Rngs(0))
  assert d(images).shape == (3,)
  with pytest.raises(ValueError, match='norm'):
    gan_lib.Generator(image_shape=shape, norm='batch', rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match='config.model.g_norm'):
    families.get('gan')(tiny_config(**{'model.g_norm': 'batch'}))


@pytest.mark.parametrize('arg', ['tiny', 'conditional,hinge,tiny', 'info,tiny'])
def test_step_updates_discriminator_then_generator_against_the_updated_discriminator(arg):
  config = tiny_config(arg, **SGD)
  family = families.get('gan')(config)
  family.load_metadata({'image_shape': [28, 28, 1], 'class_names': [str(i) for i in range(10)]})
  builder = loop.StateBuilder(family, config)
  state = jax.device_get(builder.init(None))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.integers(0, 256, (16, 28, 28, 1), np.uint8)),
           'label': jnp.asarray(rng.integers(0, 10, 16, np.int32))}
  key_d, key_g = jax.random.key(1), jax.random.key(2)
  ctx = StepContext(builder.graphdefs, state, builder.optimizers, accum_steps=1, ema_decay=0.0)
  changed = lambda a, b: [bool(np.any(x != y)) for x, y in zip(jax.tree.leaves(a),
                                                              jax.tree.leaves(b))]

  # (`any`, not `all`: some gradients are exactly 0, e.g. the hinge loss's of D's output bias
  # while every logit is inside the margin.)
  family.discriminator_update(ctx, batch, key_d)
  after_d = jax.device_get(ctx.state['params'])
  assert any(changed(after_d['discriminator'], state['params']['discriminator']))
  assert not any(changed(after_d['generator'], state['params']['generator']))
  if config.info_codes:   # InfoGAN: the discriminator's step trains the Q head
    assert all(changed(after_d['discriminator']['q'], state['params']['discriminator']['q']))

  family.generator_update(ctx, batch, key_g)
  after_g = jax.device_get(ctx.state['params'])
  assert any(changed(after_g['generator'], after_d['generator']))
  assert not any(changed(after_g['discriminator'], after_d['discriminator']))

  # SGD: the generator moved by -lr * its gradient against the UPDATED discriminator.
  def g_grads(d_params):
    models = lambda g: builder.models({'generator': g, 'discriminator': d_params}, state['rest'])
    return jax.grad(lambda g: family._g_loss(models(g), batch, key_g)[0])(  # pylint: disable=protected-access
        after_d['generator'])
  expected = optax.apply_updates(after_d['generator'],
                                 jax.tree.map(lambda g: -0.05 * g, g_grads(after_d['discriminator'])))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               after_g['generator'], expected)
  stale = optax.apply_updates(after_d['generator'], jax.tree.map(
      lambda g: -0.05 * g, g_grads(state['params']['discriminator'])))
  assert any(changed(after_g['generator'], stale))


@needs_tfds
@pytest.mark.parametrize('arg', ['tiny', 'info,tiny'])
def test_trains_on_mnist_resumes_exactly_and_samples_from_the_ema_generator(tmp_path, arg):
  config = lambda **o: tiny_config(arg, **{'log_every': 5, **o})
  full = loop.train(config(), str(tmp_path / 'full'), devices=jax.devices()[:1])
  state = jax.device_get(full.state)
  assert set(state['opt']) == {'generator', 'discriminator'}
  assert all(np.isfinite(v) for v in full.step_losses.values())
  workdir = str(tmp_path / 'resumed')
  loop.train(config(total_steps=8), workdir, devices=jax.devices()[:1])
  second = loop.train(config(), workdir, devices=jax.devices()[:1])
  assert sorted(second.step_losses) == list(range(9, 21))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state), state)
  assert os.listdir(tmp_path / 'full/samples') == ['step_0000020.png']
  # The EMA generator trails the trained one: it is what sampling uses.
  ema, live = state['ema']['generator'], state['params']['generator']
  assert any(bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(live)))


@needs_tfds
@pytest.mark.parametrize('arg', ['tiny', 'info,tiny'])
def test_data_parallel_equals_single_device(tmp_path, arg):
  assert jax.device_count() == 8
  config = lambda: tiny_config(arg, **SGD, total_steps=3, log_every=1)
  single = loop.train(config(), str(tmp_path / 'single'), devices=jax.devices()[:1])
  dp = loop.train(config(), str(tmp_path / 'dp'))
  losses = lambda r: [r.step_losses[s] for s in (1, 2, 3)]
  np.testing.assert_allclose(losses(dp), losses(single), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(dp.state['params']), jax.device_get(single.state['params']))


def test_info_loss_and_the_q_head():
  rng = np.random.default_rng(0)
  logits, codes = rng.normal(size=(6, 4)).astype(np.float32), np.array([0, 3, 1, 1, 2, 0])
  # -log softmax(logits)[code], averaged: written out with numpy.
  log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(gan_lib.info_loss(jnp.asarray(logits), jnp.asarray(codes)),
                             -log_q[np.arange(6), codes].mean(), rtol=1e-6)
  # A Q that knows nothing (uniform) scores log K: the mutual-information bound is 0.
  np.testing.assert_allclose(gan_lib.info_loss(jnp.zeros((3, 10)), jnp.arange(3)), np.log(10),
                             rtol=1e-6)
  shape, c = (8, 8, 1), 4
  d = gan_lib.Discriminator(image_shape=shape, channels=c, codes=5, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.uniform(-1, 1, (3, *shape)).astype(np.float32))
  logits, code_logits = d.with_code_logits(x)
  np.testing.assert_array_equal(logits, d(x))
  # Q reads the same features as the real/fake head: the two convs, flattened, then a dense layer.
  h = jax.nn.leaky_relu(d.conv2(jax.nn.leaky_relu(d.conv1(x), 0.2)), 0.2).reshape(3, -1)
  np.testing.assert_allclose(code_logits, h @ d.q.kernel[...] + d.q.bias[...], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match='no Q head'):
    gan_lib.Discriminator(image_shape=shape, channels=c, rngs=nnx.Rngs(0)).with_code_logits(x)
  # Unconditional sampling draws the codes uniformly.
  from train.families import gan as gan_family  # pylint: disable=import-outside-toplevel
  g = gan_lib.Generator(image_shape=shape, z_dim=4, channels=c, num_classes=5, rngs=nnx.Rngs(0))
  codes = gan_family._codes  # pylint: disable=protected-access
  drawn = np.asarray(codes(g, jax.random.key(0), 50_000))
  np.testing.assert_allclose(np.bincount(drawn, minlength=5) / 50_000, [0.2] * 5, atol=0.01)


@needs_tfds
def test_infogan_makes_its_codes_recognisable(tmp_path):
  """Within 60 steps on MNIST the info loss falls well below log 10 (Q recognises the code of a
  sample); with info_weight 0 nothing trains Q and it stays at log 10."""
  def final_info(weight):
    config = tiny_config('info,tiny', **{'total_steps': 60, 'log_every': 20,
                                         'optimizer.lr': 2e-3, 'optimizer_d.lr': 2e-3,
                                         'info_weight': weight})
    workdir = str(tmp_path / str(weight))
    loop.train(config, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    return [r['info'] for r in rows if 'info' in r][-1]
  assert final_info(1.0) < 2.0 < np.log(10) - 0.2
  assert abs(final_info(0.0) - np.log(10)) < 0.1


def test_bad_inputs_are_one_line(tmp_path):
  assert_one_line_error(run('train', f'--config={CONFIG}:tiny', f'--workdir={tmp_path}',
                            '--config.loss=wasserstein'),
                        "config.loss='wasserstein'", 'unknown GAN loss', 'hinge')
  with pytest.raises(UserError, match='r1_gamma'):
    families.get('gan')(tiny_config(r1_gamma=-1.0))
  with pytest.raises(UserError, match=r'config.info_codes=1: must be 0 \(off\) or >= 2'):
    families.get('gan')(tiny_config(info_codes=1))
  with pytest.raises(UserError, match='info_codes=10 with config.conditional=True'):
    families.get('gan')(tiny_config('conditional,tiny', info_codes=10))
  with pytest.raises(ValueError, match='ARG conditional and info together'):
    gan_mnist.get_config('conditional,info')


def test_truncated_latents_follow_the_truncated_normal():
  from scipy import stats  # pylint: disable=import-outside-toplevel
  from train.families import gan as gan_family  # pylint: disable=import-outside-toplevel
  key = jax.random.key(0)
  np.testing.assert_array_equal(gan_family.latents(key, 4, 3), jax.random.normal(key, (4, 3)))
  for t in (0.5, 1.5):
    z = np.asarray(gan_family.latents(key, 20_000, 8, t)).ravel()
    assert np.abs(z).max() <= t
    # Against scipy's truncated normal: its variance and a Kolmogorov-Smirnov test.
    np.testing.assert_allclose(z.var(), stats.truncnorm(-t, t).var(), rtol=0.02)
    assert stats.kstest(z, stats.truncnorm(-t, t).cdf).pvalue > 1e-3
  family = families.get('gan')(tiny_config())
  with pytest.raises(UserError, match='--truncation=0'):
    family.check_sample_options({'truncation': 0.0})


def test_best_of_keeps_the_candidate_the_discriminator_scores_highest():
  from train.families import gan as gan_family  # pylint: disable=import-outside-toplevel
  shape, z_dim, k, num = (8, 8, 1), 16, 5, 6
  generator = gan_lib.Generator(image_shape=shape, z_dim=z_dim, channels=4, num_classes=3,
                                rngs=nnx.Rngs(0))
  discriminator = gan_lib.Discriminator(image_shape=shape, channels=4, num_classes=3,
                                        rngs=nnx.Rngs(1))
  key, labels = jax.random.key(2), jnp.array([0, 1, 2, 2, 1, 0])
  got = np.asarray(gan_family.discriminator_best_of(generator, discriminator, key, num, labels,
                                                    None, k))
  # Reference: the num * k candidates, each scored on its own, the best of each run of k.
  z = jax.random.normal(key, (num * k, z_dim))
  for i in range(num):
    label = labels[i:i + 1]
    candidates = [generator(z[j:j + 1], label) for j in range(i * k, i * k + k)]
    scores = [float(discriminator(c, label)[0]) for c in candidates]
    assert len(set(scores)) == k   # a real choice
    np.testing.assert_allclose(got[i], candidates[int(np.argmax(scores))][0], atol=1e-5)
  # k = 1 is plain sampling.
  np.testing.assert_array_equal(
      gan_family.discriminator_best_of(generator, discriminator, key, num, labels, None, 1),
      gan_family._fake(generator, key, num, labels))  # pylint: disable=protected-access
  family = families.get('gan')(tiny_config())
  with pytest.raises(UserError, match='--best_of=0: must be >= 1'):
    family.check_sample_options({'best_of': 0})
