r"""English -> German translation on Multi30k (task 1) with a small transformer encoder-decoder.

Default (no ARG): 3 encoder + 3 decoder pre-LN layers (models/layers.py blocks), width 256, 4
heads, MLP 512, dropout 0.1, a joint byte-level BPE vocabulary of 8000 tokens shared by both
languages (one embedding for encoder input, decoder input and output projection: the two
languages share most of their characters and many names and numbers), label smoothing 0.1,
AdamW (b2 0.98, weight decay 0.01, peak lr 1e-3), 150 warmup steps then cosine decay to 1e-5 at
step 3000 (~9.5 epochs), batches of 24 packed rows of 64 tokens per side (~96 sentence pairs).
  Command:  GENLAB_RAW_DATA=DIR python -m train \
                --config=experiments/configs/translate_multi30k.py --workdir=/tmp/tr
            GENLAB_RAW_DATA=DIR python -m train.evaluate --workdir=/tmp/tr \
                --split=test2016 --beam_size=4
            (DIR holds multi30k/*.gz, the task 1 raw files)
  Hardware: 2-core CPU, Zen 4 (cpu family 25), shared with two other engineers' (niced) jobs.
  Runtime:  40.4 min wall; 70 min of CPU time (3176 s user + 1024 s system); median 3,675 real
            tokens/s as logged.
  Result:   6.0M params; val perplexity 6.63 per target token. test2016 BLEU 37.19 / chrF 61.33
            with beam 4 (greedy: 35.05 / 60.24); test2017 28.59 / 55.67; test2018 26.78 / 53.07
            (sacreBLEU 13a, cased, detokenised output vs the raw references). Details:
            experiments/README.md.

Batches are packed, not length-bucketed: the loop compiles ONE train step for one batch shape,
and packing several sentence pairs into each row of fixed length (segment ids keep the pairs
from attending to each other) fills ~93% of the token slots with real tokens, where padding
every pair to the longest one would waste ~75% of the compute.

ARG `de_en`: the reverse direction, German -> English.
ARG `tiny`: a smoke run (1+1 layers, width 32, vocabulary 300, 20 steps) in seconds.

Data: the raw Multi30k files (train.en.gz, val.de.gz, test_2016_flickr.en.gz, ...) from
--config.data.raw_dir=DIR (or DIR/multi30k), else $GENLAB_RAW_DATA/multi30k.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.family = 'translate'
  c.seed = 0
  c.total_steps = 3000           # ~9.5 epochs
  c.batch_size = 24              # packed rows of model.max_len tokens per side (~96 pairs)
  c.log_every = 25
  c.eval_every = 500
  c.checkpoint_every = 250
  c.label_smoothing = 0.1
  c.data.name = 'multi30k'
  c.data.source = 'en'
  c.data.target = 'de'
  c.data.vocab_size = 8000
  c.data.max_train_pairs = 0     # > 0: train (and fit the tokenizer) on the first N pairs only
  c.model = dict(num_encoder_layers=3, num_decoder_layers=3, num_heads=4, embed_dim=256,
                 mlp_dim=512, dropout=0.1, max_len=64)
  c.model.dropout_bits = 32   # dropout masks: 32 bernoulli; 8 or 16 cheaper (models.layers.dropout)
  c.decode = dict(beam_size=4, length_penalty=0.6)
  c.sharding.rules = common.MEGATRON_RULES   # with --config.mesh.tensor=N
  c.sharding.divides = (('tensor', 'model.num_heads'),)
  c.optimizer.update(lr=1e-3, schedule='cosine', warmup_steps=150, decay_steps=3000,
                     min_lr=1e-5, b1=0.9, b2=0.98, weight_decay=0.01, grad_clip=1.0)
  if arg is None:
    return c
  if arg == 'de_en':
    c.data.source, c.data.target = 'de', 'en'
  elif arg == 'tiny':
    c.total_steps = c.optimizer.decay_steps = 20
    c.optimizer.warmup_steps = 2
    c.batch_size = 8
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
    c.data.vocab_size = 300
    c.model.update(num_encoder_layers=1, num_decoder_layers=1, num_heads=2, embed_dim=32,
                   mlp_dim=64, max_len=64)
    c.decode.beam_size = 2
  else:
    raise ValueError(f'unknown ARG {arg!r} (use de_en or tiny)')
  return c
