r"""Text-to-image diffusion on MNIST captions: a cross-attention UNet and a caption encoder.

Captions (train/captions.py) name the digit and its measured stroke thickness and slant ("a
thick, left-slanted seven"), in five phrasings; three (digit, thickness, slant) combinations
are held out of training. UNet 16-32-64 channels at 28/14/7 pixels as ddpm_mnist.py, with
4-head cross-attention to the caption after the self-attention at 7x7 and in the middle, and
the caption's mean token added to the time embedding; caption encoder: 2 pre-LN transformer
blocks, width 64, 4 heads, 12 tokens, trained jointly. Cosine schedule, T = 1000, eps
prediction; captions dropped to the null caption with p = 0.1 (classifier-free guidance); AdamW
lr 1e-3 (cosine to 1e-5 over 1500 steps), batch 64, EMA 0.998.

  Command:  python -m train --config=experiments/configs/text2image_mnist.py --workdir=/tmp/t2i
            python -m train.sample --workdir=/tmp/t2i --prompt="a thick, right-slanted seven" \
              --guidance=3 --num_samples=16 --out=x.png
            python -m train.evaluate --workdir=/tmp/t2i --prompts=test \
              --classifier=workdirs/classifier_mnist [--clip=CLIP_RUN]
  Hardware: 2-core CPU (this project's CI machine).
  Runtime and result: see experiments/README.md (not yet measured at this commit).

ARG `fashion_mnist`: the same on Fashion-MNIST (captions: brightness and texture).
ARG `tiny`: 8-wide UNet, T = 100, a 1-block width-16 encoder, 20 steps of batch 16: a smoke run.

Data: TFDS `mnist` / `fashion_mnist` from --config.data.data_dir or $TFDS_DATA_DIR (prepared
without TensorFlow from --config.data.raw_dir when missing).
"""

from experiments.configs import ddpm_mnist


def get_config(arg: str | None = None):
  args = set(arg.split(',')) if arg else set()
  unknown = args - {'fashion_mnist', 'tiny'}
  if unknown:
    raise ValueError(f'unknown ARG {sorted(unknown)} (use fashion_mnist and/or tiny)')
  c = ddpm_mnist.diffusion_config('fashion_mnist' if 'fashion_mnist' in args else 'mnist',
                                  {'cond'} | (args & {'tiny'}))
  c.family = 'text2image'
  c.model.context_heads = 4
  c.text = dict(max_len=12, num_layers=2, num_heads=4, embed_dim=64, dropout=0.0)
  del c.diffusion['label_dropout']
  c.diffusion.caption_dropout = 0.1
  c.total_steps = c.optimizer.decay_steps = 1500
  c.eval_every = 500
  c.checkpoint_every = 250
  c.sample_every = 0
  if 'tiny' in args:
    c.total_steps = c.optimizer.decay_steps = 20
    c.eval_every = c.checkpoint_every = 10
    c.sample_every = 0
    c.model.context_heads = 2
    c.text.update(num_layers=1, num_heads=2, embed_dim=16)
  return c
