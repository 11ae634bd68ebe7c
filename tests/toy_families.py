"""Small families for testing the loop without a dataset.

* `ToyRegression`: an MLP fitting y = sin(x) on batches that are a pure function of (seed, step);
  `config.nan_step` (>= 0) puts a NaN into that step's batch to test the non-finite guard;
  `config.nan_state` ('params' | 'opt') writes a NaN into that part of the state after the
  update of step `config.nan_state_step`, while that step's loss stays finite;
  `config.ballast` (> 0) adds an unused random parameter of that many floats (big checkpoints).
* `ToyGAN`: a 1-D GAN (generator z -> a*z + b, MLP discriminator) trained with two optimizers
  inside ONE jitted step through `Family.train_step`: discriminator update first, then the
  generator update against the freshly updated discriminator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from experiments.configs import common
from train import families
from train.family import Family


class MLP(nnx.Module):

  def __init__(self, din, hidden, dout, *, rngs):
    self.l1 = nnx.Linear(din, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class ToyRegression(Family):
  name = 'toy_regression'

  def setup_data(self, process_index, process_count):
    self._slice = slice(process_index * self.config.batch_size // process_count,
                        (process_index + 1) * self.config.batch_size // process_count)

  def _global_batch(self, step, seed):
    rng = np.random.default_rng((seed, step))
    x = rng.uniform(-3, 3, (self.config.batch_size, 1)).astype(np.float32)
    if step == self.config.nan_step:
      x[0, 0] = np.nan
    return {'x': x, 'y': np.sin(x)}

  def train_batch(self, step):
    return {k: v[self._slice] for k, v in self._global_batch(step, self.config.seed).items()}

  def eval_batches(self):
    return [{k: v[self._slice] for k, v in self._global_batch(i, 10_000).items()}
            for i in range(2)]

  def make_models(self, rngs):
    model = MLP(1, self.config.hidden, 1, rngs=rngs)
    if self.config.get('ballast', 0):
      model.ballast = nnx.Param(jax.random.normal(rngs.params(), (self.config.ballast,)))
    return {'model': model}

  def loss(self, models, batch, rng, *, train):
    return jnp.mean((models['model'](batch['x']) - batch['y']) ** 2), {}

  def train_step(self, ctx, batch, rng):
    metrics = super().train_step(ctx, batch, rng)
    where = self.config.get('nan_state', '')
    if where:
      poison = lambda tree: jax.tree.map(
          lambda x: jnp.where(ctx.step == self.config.nan_state_step, jnp.nan, x)
          if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)
      ctx.state[where] = dict(ctx.state[where], model=poison(ctx.state[where]['model']))
    return metrics


class ToyGAN(Family):
  name = 'toy_gan'

  def setup_data(self, process_index, process_count):
    self._slice = slice(process_index * self.config.batch_size // process_count,
                        (process_index + 1) * self.config.batch_size // process_count)

  def train_batch(self, step):
    rng = np.random.default_rng((self.config.seed, step))
    real = rng.normal(self.config.real_mean, 1.0, (self.config.batch_size, 1))
    return {'real': real.astype(np.float32)[self._slice]}

  def eval_batches(self):
    return []

  def make_models(self, rngs):
    return {'generator': nnx.Linear(1, 1, rngs=rngs),
            'discriminator': MLP(1, 16, 1, rngs=rngs)}

  def optimizers(self, make_tx):
    return {'discriminator': make_tx(self.config.optimizer),
            'generator': make_tx(self.config.optimizer)}

  def loss(self, models, batch, rng, *, train):
    raise NotImplementedError('ToyGAN has two losses; see train_step')

  @staticmethod
  def _fake(models, batch, rng):
    z = jax.random.normal(rng, batch['real'].shape)
    return models['generator'](z)

  def train_step(self, ctx, batch, rng):
    def d_loss(models, b, r):
      d = models['discriminator']
      fake = jax.lax.stop_gradient(self._fake(models, b, r))
      # -log D(real) - log(1 - D(fake)) with D = sigmoid(logit)
      loss = (optax.sigmoid_binary_cross_entropy(d(b['real']), 1.0).mean()
              + optax.sigmoid_binary_cross_entropy(d(fake), 0.0).mean())
      return loss, {}

    def g_loss(models, b, r):  # non-saturating: -log D(G(z))
      return optax.sigmoid_binary_cross_entropy(
          models['discriminator'](self._fake(models, b, r)), 1.0).mean(), {}

    key_d, key_g = jax.random.split(rng)
    loss_d, _, grads = ctx.value_and_grad(d_loss, 'discriminator', batch, key_d)
    ctx.apply_gradients('discriminator', grads)
    loss_g, _, grads = ctx.value_and_grad(g_loss, 'generator', batch, key_g)
    ctx.apply_gradients('generator', grads)
    fake_mean = jnp.mean(self._fake(ctx.models(), batch, key_g))
    return {'loss': loss_d + loss_g, 'loss_d': loss_d, 'loss_g': loss_g, 'fake_mean': fake_mean}


families.register('toy_regression', 'tests.toy_families:ToyRegression')
families.register('toy_gan', 'tests.toy_families:ToyGAN')


def regression_config(**overrides) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.family = 'toy_regression'
  c.total_steps = 6
  c.batch_size = 16
  c.hidden = 32
  c.nan_step = -1
  c.nan_state = ''
  c.nan_state_step = -1
  c.ballast = 0
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 0
  c.optimizer.update(name='sgd', lr=0.1, schedule='constant', warmup_steps=0, grad_clip=0.0)
  c.update_from_flattened_dict(overrides)
  return c


def gan_config(**overrides) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.family = 'toy_gan'
  c.total_steps = 300
  c.batch_size = 64
  c.real_mean = 4.0
  c.log_every = 50
  c.eval_every = 0
  c.checkpoint_every = 0
  c.optimizer.update(name='adam', lr=0.02, schedule='constant', warmup_steps=0, b1=0.5,
                     grad_clip=0.0)
  c.update_from_flattened_dict(overrides)
  return c
