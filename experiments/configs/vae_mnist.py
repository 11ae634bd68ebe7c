r"""VAE on binarised MNIST (or Fashion-MNIST).

(Docstring with commands, runtimes and results: being measured.)
"""

from experiments.configs import common

_ARGS = ('iwae', 'conditional', 'gaussian', 'fashion_mnist', 'tiny')


def get_config(arg: str | None = None):
  args = set(arg.split(',')) if arg else set()
  unknown = args - set(_ARGS)
  if unknown:
    raise ValueError(f'unknown ARG {sorted(unknown)} (use {", ".join(_ARGS)}, comma-separated)')
  c = common.base_config()
  c.family = 'vae'
  c.seed = 0
  c.total_steps = 12_000
  c.batch_size = 100
  c.log_every = 200
  c.eval_every = 3000
  c.eval_batches = 0             # the whole test split
  c.eval_iwae_samples = 0        # k of an IWAE bound in every eval (0: off; costs k decoder passes)
  c.checkpoint_every = 3000
  c.keep_checkpoints = 1
  c.conditional = 'conditional' in args
  c.beta = 1.0                   # KL weight; 1 is the ELBO
  c.iwae_samples = 5000          # k of the test NLL (train.evaluate)
  c.iwae_chunk = 100             # samples per decoder pass (memory ~ chunk x iwae_batch images)
  c.iwae_batch = 100             # test images per pass
  c.sample_count = 64
  c.data.name = 'fashion_mnist' if 'fashion_mnist' in args else 'mnist'
  c.data.binarize = 'dynamic'    # 'dynamic' | 'static' | 'none' (Bernoulli needs binary pixels)
  c.model = dict(architecture='conv', hidden=(256,), latent_dim=32, activation='relu',
                 channels=(32, 64), likelihood='bernoulli', learn_scale=True, log_scale=-2.0)
  c.optimizer.update(name='adam', lr=1e-3, schedule='cosine', warmup_steps=0, decay_steps=12_000,
                     min_lr=1e-4, grad_clip=0.0)
  if 'iwae' in args:
    # Burda et al. (2016), one stochastic layer, k = 1: 784-200-200-50 tanh MLPs, Bernoulli
    # decoder, Adam (they: batch 20, 3280 epochs, lr 1e-3 decayed by 10^(-1/7) per stage).
    c.model.update(architecture='mlp', hidden=(200, 200), latent_dim=50, activation='tanh')
  if 'gaussian' in args:
    c.data.binarize = 'none'
    c.model.likelihood = 'gaussian'
  if 'tiny' in args:
    c.total_steps = c.optimizer.decay_steps = 30
    c.batch_size = 32
    c.log_every = 10
    c.eval_every = 0
    c.eval_batches = 2
    c.eval_iwae_samples = 8
    c.checkpoint_every = 0
    c.iwae_samples = 16
    c.iwae_chunk = 8
    c.sample_count = 16
    c.model.update(hidden=(32,) * len(c.model.hidden), latent_dim=8, channels=(8, 8))
  return c
