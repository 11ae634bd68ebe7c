r"""Text-to-image diffusion on MNIST captions: a cross-attention UNet and a caption encoder.

Captions (train/captions.py) name the digit and its measured stroke thickness and slant ("a
thick, left-slanted seven"), in five phrasings; three (digit, thickness, slant) combinations
are held out of training. UNet 16-32-64 channels at 28/14/7 pixels as ddpm_mnist.py, with
4-head cross-attention to the caption after the self-attention at 7x7 and in the middle, and
the caption's mean token added to the time embedding; caption encoder: 2 pre-LN transformer
blocks, width 64, 4 heads, 12 tokens, trained jointly. Cosine schedule, T = 1000, eps
prediction; captions dropped to the null caption with p = 0.1 (classifier-free guidance); AdamW
lr 1e-3 (100 warmup steps, cosine to 1e-5 over 3600 steps, the schedule of ddpm_mnist.py:cond),
batch 64, 3600 steps, EMA 0.998; checkpoints every 600 steps (a stopped run resumes exactly).

  Command:  python -m train --config=experiments/configs/text2image_mnist.py --workdir=/tmp/t2i
            python -m train.sample --workdir=/tmp/t2i --prompt="a thick, right-slanted seven" \
              --guidance=3 --num_samples=16 --out=x.png
            python -m train.evaluate --workdir=/tmp/t2i --prompts=test \
              --classifier=workdirs/classifier_mnist [--clip=CLIP_RUN]
  Hardware: 2-core CPU (this project's CI machine; AMD Zen 4 host, cpu family 25).
  Measured (December), the full 3600 steps (stopped by SIGTERM at step 3017 for lack of time
  and resumed with the same command; resuming is exact): 95 min wall, 3375 s user + 942 s
  system CPU time in the two parts (`nice -n 5 /usr/bin/time -v`; load average 5-9 from other
  jobs; 1.0-1.8 s/step; train-step compile 90 s); eval_ema/loss 0.0385 at step 3600.
  train.evaluate at step 3600 (--prompts=test --classifier=CLS --clip=CLIP --guidance=3
  --num_samples=300 --steps=50 --batch=300; CLS the classifier_mnist.py run, 99.2% test
  accuracy, CLIP the clip_mnist.py run; 264 s user + 26 s system CPU, 4.9 min wall, load 4-7):
    seen:   attribute accuracy 0.940 (thickness 0.993, slant 0.887; both right 0.883; chance
            0.417), label accuracy 0.863 (real images of the same captions: 0.997), Frechet
            distance 24.2 (real 8.7), CLIP score 0.726 (real 0.782)
    unseen: attribute accuracy 0.903 (thickness 1.000, slant 0.807), label accuracy 0.563
            (real 0.997), Frechet distance 198 (real 231: three digits only), CLIP score 0.626
            (real 0.791)
  The issue's goals on seen combinations: attribute accuracy >= 80% is met; label accuracy
  >= 90% is NOT (0.863). At step 3017 (`--config.total_steps=3017`, same evaluation) it was
  0.807 at guidance 3 and 0.800 at guidance 5 (attribute accuracy 0.922 and 0.945): stronger
  guidance sharpens the attributes, not the digit.

ARG `fashion_mnist`: the same on Fashion-MNIST (captions: brightness and texture).
ARG `tiny`: 8-wide UNet, T = 100, a 1-block width-16 encoder, 20 steps of batch 16: a smoke run.
  `python -m train --config=experiments/configs/text2image_mnist.py:tiny --workdir=/tmp/t2i_tiny`:
  121 s user + 8 s system CPU time (31 min wall at nice 19, load average 6-9 from other jobs);
  then `python -m train.sample --workdir=/tmp/t2i_tiny --prompt="a thick, right-slanted
  seven;a thin 2" --guidance=3 --num_samples=4 --steps=5 --out=x.png` writes the 2 x 4 grid
  (noise at 20 steps) in 15 s user + 1 s system CPU.

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
  c.eval_every = 1200
  c.checkpoint_every = 600
  c.sample_every = 0
  if 'tiny' in args:
    c.total_steps = c.optimizer.decay_steps = 20
    c.eval_every = c.checkpoint_every = 10
    c.sample_every = 0
    c.model.context_heads = 2
    c.text.update(num_layers=1, num_heads=2, embed_dim=16)
  return c
