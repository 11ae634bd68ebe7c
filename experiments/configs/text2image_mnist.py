r"""Text-to-image diffusion on MNIST captions: a cross-attention UNet and a caption encoder.

Captions (train/captions.py) name the digit and its measured stroke thickness and slant ("a
thick, left-slanted seven"), in five phrasings; three (digit, thickness, slant) combinations
are held out of training. UNet 16-32-64 channels at 28/14/7 pixels as ddpm_mnist.py, with
4-head cross-attention to the caption after the self-attention at 7x7 and in the middle, and
the caption's mean token added to the time embedding; caption encoder: 2 pre-LN transformer
blocks, width 64, 4 heads, 12 tokens, trained jointly. Cosine schedule, T = 1000, eps
prediction; captions dropped to the null caption with p = 0.1 (classifier-free guidance); AdamW
lr 1e-3 (100 warmup steps, cosine to 1e-5 over the run), batch 64, 6000 steps, EMA 0.998;
checkpoints every 600 steps (a stopped run resumes exactly).

  Command:  python -m train --config=experiments/configs/text2image_mnist.py --workdir=/tmp/t2i
            python -m train.sample --workdir=/tmp/t2i --prompt="a thick, right-slanted seven" \
              --guidance=3 --num_samples=16 --out=x.png
            python -m train.evaluate --workdir=/tmp/t2i --prompts=test \
              --classifier=workdirs/classifier_mnist [--clip=CLIP_RUN]
  Hardware: 2-core CPU (this project's CI machine; AMD Zen 4 host, cpu family 25).
  Measured (December): 6000 steps in 1 h 55 min wall, 5657 s user + 1601 s system CPU time
  (`/usr/bin/time -v`; beside other jobs of this project, one training run at a time and for 11
  min the test suite, for all but its last 20 min; 0.78-0.95 s/step alone, up to 1.73 shared);
  eval_ema/loss 0.0379 / 0.0370 / 0.0367 at steps 3600 / 4800 / 6000. train.evaluate at step
  6000 (--prompts=test --classifier=CLS --clip=CLIP --guidance=3 --num_samples=300 --steps=50
  --batch=300; CLS the classifier_mnist.py run, 99.2% test accuracy, CLIP the clip_mnist.py
  run; 292 s user + 30 s system CPU, 4.4 min wall, alone):
    seen:   attribute accuracy 0.968 (thickness 0.990, slant 0.947; both right 0.937; chance
            0.417), label accuracy 0.993 (real images of the same captions: 0.997), Frechet
            distance 11.9 (real 8.7), CLIP score 0.786 (real 0.782)
    unseen: attribute accuracy 0.945 (thickness 1.000, slant 0.890), label accuracy 0.987
            (real 0.997), Frechet distance 276 (real 231: three digits only), CLIP score 0.797
            (real 0.791)
  The issue's goals on seen combinations, label accuracy >= 90% and attribute accuracy >= 80%,
  are met. The earlier 3600-step schedule (`--config.total_steps=3600
  --config.optimizer.decay_steps=3600`; 95 min wall at load 5-9) gave label accuracy 0.863 and
  attribute accuracy 0.940 on seen captions, 0.563 and 0.903 on unseen, with the same
  evaluation: the digit needed the longer training, not a different sampler (experiments/
  README.md has that run's guidance and DDIM-step rows).

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
  c.total_steps = c.optimizer.decay_steps = 6000
  if 'tiny' in args:
    c.total_steps = c.optimizer.decay_steps = 20
    c.eval_every = c.checkpoint_every = 10
    c.sample_every = 0
    c.model.context_heads = 2
    c.text.update(num_layers=1, num_heads=2, embed_dim=16)
  return c
