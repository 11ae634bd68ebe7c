r"""DDPM on CIFAR-10 (Ho et al. 2020's CIFAR-10 model), for users who have the data and a GPU.

UNet 128 channels, channel_mult (1, 2, 2, 2) at 32/16/8/4 pixels, 2 residual blocks per level,
self-attention at 16x16, dropout 0.1 (35.7M params); linear schedule over T = 1000 steps, eps
prediction, fixed variance beta (DDPM's CIFAR-10 choice), simple loss; Adam lr 2e-4 with 5000
warmup steps, batch 128, grad clip 1, EMA 0.9999, 800k steps (the paper's). Samples with
DDPM's ancestral sampler by default.
  Command:  python -m train --config=experiments/configs/ddpm_cifar10.py --workdir=DIR \
              [--config.data.data_dir=TFDS_DIR_WITH_CIFAR10] [--config.model.dtype=bfloat16]
  Hardware: accelerators (the paper: TPU v3-8, 21 steps/s, 10.6 h for 800k steps).
  Runtime:  not run in this project: CIFAR-10 is not in the project's offline data.
  Result:   the paper reports FID 3.17, NLL <= 3.75 bits/dim on the test set.

ARG `cond`: class-conditional with classifier-free guidance (p = 0.1). ARG `tiny`: a smoke run
(checks the config and data, seconds on CPU; needs CIFAR-10 prepared).

Data: TFDS `cifar10` from --config.data.data_dir or $TFDS_DATA_DIR (prepared elsewhere; the
TF-free builders of this project cover mnist, fashion_mnist and tiny_shakespeare).
"""

from experiments.configs import ddpm_mnist


def get_config(arg: str | None = None):
  args = set(arg.split(',')) if arg else set()
  c = ddpm_mnist.diffusion_config('cifar10', args)
  if 'tiny' in args:
    c.model.update(attention_resolutions=(16,))
    return c
  c.total_steps = 800_000
  c.batch_size = 128
  c.log_every = 500
  c.eval_every = 10_000
  c.eval_batches = 10
  c.checkpoint_every = 10_000
  c.sample_every = 10_000
  c.sample_count = 64
  c.ema_decay = 0.9999
  c.model.update(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,), dropout=0.1, groups=32)
  c.diffusion.update(schedule='linear', variance='beta')
  c.sampling.update(sampler='ddpm', batch=256, vlb_images=64)
  c.optimizer.update(name='adam', lr=2e-4, schedule='constant', warmup_steps=5000,
                     decay_steps=800_000, min_lr=2e-4, weight_decay=0.0, grad_clip=1.0)
  return c
