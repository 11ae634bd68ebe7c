r"""DCGAN-style GAN on MNIST (or Fashion-MNIST).

(Docstring with commands, runtimes and results: being measured.)
"""

import ml_collections

from experiments.configs import common

_ARGS = ('hinge', 'conditional', 'fashion_mnist', 'tiny')


def get_config(arg: str | None = None):
  args = set(arg.split(',')) if arg else set()
  unknown = args - set(_ARGS)
  if unknown:
    raise ValueError(f'unknown ARG {sorted(unknown)} (use {", ".join(_ARGS)}, comma-separated)')
  c = common.base_config()
  c.family = 'gan'
  c.seed = 0
  c.total_steps = 10_000
  c.batch_size = 64
  c.log_every = 200
  c.eval_every = 2000
  c.eval_batches = 4             # D and G losses on 4 test batches
  c.checkpoint_every = 2000
  c.keep_checkpoints = 1
  c.sample_every = 2000          # a PNG grid of EMA-generator samples
  c.sample_count = 100
  c.ema_decay = 0.999            # samples come from the generator's EMA
  c.conditional = 'conditional' in args
  c.loss = 'hinge' if 'hinge' in args else 'non_saturating'
  c.r1_gamma = 1.0               # R1 penalty weight on real images (0: off)
  c.data.name = 'fashion_mnist' if 'fashion_mnist' in args else 'mnist'
  c.model = dict(z_dim=64, g_channels=32, d_channels=32)
  # Generator (`optimizer`) and discriminator (`optimizer_d`): Adam, DCGAN's lr 2e-4, beta1 0.5.
  c.optimizer.update(name='adam', lr=2e-4, schedule='constant', warmup_steps=0, b1=0.5, b2=0.999,
                     grad_clip=0.0)
  c.optimizer_d = ml_collections.ConfigDict(c.optimizer.to_dict())
  if 'tiny' in args:
    c.total_steps = 20
    c.batch_size = 16
    c.log_every = 5
    c.eval_every = 0
    c.eval_batches = 1
    c.checkpoint_every = 0
    c.sample_every = 0
    c.sample_count = 16
    c.model.update(z_dim=8, g_channels=4, d_channels=4)
  return c
