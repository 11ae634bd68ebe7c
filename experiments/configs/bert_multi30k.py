r"""BERT (encoder-only masked language model) on Multi30k English sentences.

Default (no ARG): 4 layers, 4 heads, width 128, sentences of at most 32 tokens (BOS and EOS
included; 0.7% of training sentences are truncated), a byte-level BPE vocabulary of 4000 trained
on the train split, BERT's masking (15% of tokens; 80% [MASK], 10% random, 10% kept), dropout
0.1, batch 64 sentences, 1200 steps (2.6 epochs), AdamW lr 1.5e-3 (100 warmup steps, cosine to
1e-4), weight decay 0.01.
  Command:  python -m train --config=experiments/configs/bert_multi30k.py --workdir=/tmp/bert
  Hardware: 2-core CPU (AMD Zen 4, cpu family 25), shared: load average 7-16 during the run.
  Runtime:  15.0 min wall, 295 s user + 100 s system CPU time (1.33M params, 11.5 GFLOP/step;
            0.5-0.75 s/step under that load).
  Result:   val (1014 sentences, the same masks at every eval) masked-token accuracy 29.8%,
            loss 4.24 at step 1200 (23.6% / 28.2% at steps 400 / 800), against 7.1% accuracy
            and loss 6.00 for the unigram baseline (always the most frequent training token /
            the training unigram distribution).
  Fill-mask: python -m train.sample --workdir=/tmp/bert --prompt="a man in a [MASK] shirt ." --top_k=5
            [MASK] #1: 'blue' 0.124  'red' 0.123  'white' 0.114  'black' 0.101  'yellow' 0.037

ARG `de`: the same on the German side.
ARG `tiny`: a smoke run (2 layers, width 32, vocab 300, 12 steps on 2000 sentences), well
under a minute of CPU time.

Data: Multi30k task 1 raw files (train.en.gz, val.en.gz, ...) from --config.data.raw_dir=DIR
(or DIR/multi30k), else $GENLAB_RAW_DATA/multi30k. Nothing downloads.
"""

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.family = 'bert'
  c.seed = 0
  c.total_steps = 1200
  c.batch_size = 64
  c.log_every = 100
  c.eval_every = 400
  c.checkpoint_every = 400
  c.data.name = 'multi30k'
  c.data.language = 'en'
  c.data.vocab_size = 4000
  c.data.train_sentences = 0     # 0: all 29000 (fewer: the first N, for smoke runs)
  c.data.eval_sentences = 0      # 0: all 1014 of val
  c.model = dict(max_len=32, num_layers=4, num_heads=4, embed_dim=128, dropout=0.1,
                 dtype='float32')
  c.model.init_std = config_dict.placeholder(float)   # None: 1/sqrt(embed_dim)
  c.model.attention = config_dict.placeholder(str)    # None: einsum on CPU, else XLA's fused
  c.model.dropout_bits = 32   # dropout masks: 32 bernoulli; 8 or 16 cheaper (models.layers.dropout)
  c.mlm = dict(rate=0.15, mask_prob=0.8, random_prob=0.1)
  c.optimizer.update(lr=1.5e-3, schedule='cosine', warmup_steps=100, decay_steps=1200,
                     min_lr=1e-4, b1=0.9, b2=0.98, weight_decay=0.01, grad_clip=1.0)
  c.sharding.rules = common.MEGATRON_RULES   # with --config.mesh.tensor=N
  c.sharding.divides = (('tensor', 'model.num_heads'),)
  if arg is None:
    return c
  if arg == 'de':
    c.data.language = 'de'
  elif arg == 'tiny':
    c.total_steps = c.optimizer.decay_steps = 12
    c.optimizer.warmup_steps = 2
    c.batch_size = 16
    c.log_every = 4
    c.eval_every = 6
    c.checkpoint_every = 6
    c.data.vocab_size = 300
    c.data.train_sentences = 2000
    c.data.eval_sentences = 64
    c.model.update(max_len=24, num_layers=2, num_heads=2, embed_dim=32)
  else:
    raise ValueError(f'unknown ARG {arg!r} (use de or tiny)')
  return c
