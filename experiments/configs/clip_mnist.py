r"""Contrastive text-image model (CLIP-style) on captioned MNIST (or Fashion-MNIST).

Captions: train/captions.py (the label and measured attributes: MNIST stroke thickness and slant,
Fashion-MNIST brightness and texture; several phrasings; held-out combinations left out of the
train split). Image encoder: the classifier's CNN, conv3x3(16)-pool-conv3x3(32)-pool-dense(128),
then a projection to 64; text encoder: 2 pre-LN transformer blocks of width 64, 4 heads, over
at most 12 word tokens (the longest caption), mean-pooled, projected to 64 (models/clip.py). Symmetric InfoNCE with a
learned logit scale (init 1/0.07, clipped at 100), batch 256, 2000 steps, AdamW lr 1e-3 (100
warmup steps, cosine to 1e-5), weight decay 1e-4.

Default (no ARG): MNIST.
  Command:  python -m train --config=experiments/configs/clip_mnist.py --workdir=workdirs/clip_mnist
            python -m train.evaluate --workdir=workdirs/clip_mnist
  Hardware: 2-core CPU (AMD Zen 4 host, cpu family 25), shared: load average 10-13 from other
            jobs, run under `nice -n 19 /usr/bin/time -v` (December).
  Runtime:  training 34.6 min wall, 455 s user + 216 s system CPU time (0.86-1.04 s/step at that
            load; 3.77 GFLOP/step); evaluation 58 s wall, 19 s user + 2 s system.
  Result:   final train loss 1.84, test loss 1.90, in-batch accuracy 0.21-0.22 (a batch of 256
            holds ~4.5 pairs of each combination: its false negatives cap the loss near log 4.5
            and the in-batch accuracy near 1 / 4.5). Over the 10,000 test pairs (a hit: a
            retrieved item has the query's label, thickness and slant; chance at 1: 0.019-0.021):
              text->image  seen:   recall@1 1.000  recall@5 1.000
              text->image  unseen: recall@1 1.000  recall@5 1.000   (585 held-out pairs)
              image->text  seen:   recall@1 0.909  recall@5 0.909   (label alone: 0.990)
              image->text  unseen: recall@1 0.860  recall@5 0.860   (label alone: 0.990)
            Image->text is the hard direction: it names the thickness and slant of every test
            image, also those near a category threshold; its top 5 are near-copies of one
            caption (other phrasings of the same combination), so @5 adds nothing.

ARG `fashion_mnist`: the same on Fashion-MNIST (--config.data.raw_dir=DIR_WITH_IDX_FILES
--config.data.data_dir=YOUR_TFDS_DIR prepare it without TensorFlow on first use).
  Command:  python -m train --config=experiments/configs/clip_mnist.py:fashion_mnist \
              --workdir=workdirs/clip_fashion [--config.data.data_dir=YOUR_TFDS_DIR]
            python -m train.evaluate --workdir=workdirs/clip_fashion
  Runtime:  training 23.4 min wall, 433 s user + 198 s system CPU time (same host, load
            average 4-11, nice 19, December); evaluation 19 s user + 2 s system CPU time (506 s
            wall: the process waited at nice 19 behind other jobs, load ~11).
  Result:   final train loss 2.54, test loss 2.69. Over the 10,000 test pairs (a hit: label,
            brightness and texture; chance at 1: 0.022-0.037):
              text->image  seen:   recall@1 0.976  recall@5 1.000
              text->image  unseen: recall@1 1.000  recall@5 1.000   (428 held-out pairs)
              image->text  seen:   recall@1 0.801  recall@5 0.801   (label alone: 0.904)
              image->text  unseen: recall@1 0.657  recall@5 0.657   (label alone: 0.808)

ARG `tiny`: a smoke run (8/16-wide convs, one block of width 32, 6 steps of batch 16).
`fashion_mnist,tiny` combines both.

Then: `python -m train.sample --workdir=workdirs/clip_mnist --prompt="a thick, left-slanted
seven"` writes the test images that match the prompt best; `train.families.clip.clip_score`
scores generated images against their captions.
"""

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None):
  args = set(arg.split(',')) if arg else set()
  unknown = args - {'fashion_mnist', 'tiny'}
  if unknown:
    raise ValueError(f'unknown ARG {sorted(unknown)} (use fashion_mnist and/or tiny)')
  c = common.base_config()
  c.family = 'clip'
  c.seed = 0
  c.total_steps = 2000
  c.batch_size = 256
  c.log_every = 100
  c.eval_every = 1000
  c.eval_batches = 10            # 2560 test pairs
  c.checkpoint_every = 1000
  c.keep_checkpoints = 1
  c.data.name = 'mnist'
  c.model = dict(proj_dim=64, channels=(16, 32), hidden=128, max_len=12, num_layers=2,
                 num_heads=4, embed_dim=64, dropout=0.0, dropout_bits=32, dtype='float32')
  c.model.attention = config_dict.placeholder(str)    # None: einsum on CPU, else XLA's fused
  c.optimizer.update(lr=1e-3, schedule='cosine', warmup_steps=100, decay_steps=2000,
                     min_lr=1e-5, weight_decay=1e-4, grad_clip=1.0)
  if 'fashion_mnist' in args:
    c.data.name = 'fashion_mnist'
  if 'tiny' in args:
    c.total_steps = c.optimizer.decay_steps = 6
    c.optimizer.update(lr=3e-3, warmup_steps=1)
    c.batch_size = 16
    c.log_every = 2
    c.eval_every = 0
    c.eval_batches = 2
    c.checkpoint_every = 2
    c.keep_checkpoints = 3
    c.model.update(proj_dim=16, channels=(8, 16), hidden=32, num_layers=1, num_heads=2,
                   embed_dim=32)
  return c
