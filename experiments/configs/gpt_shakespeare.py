r"""Char-level GPT on Tiny Shakespeare: nanoGPT's `shakespeare_char` configs, in JAX.

Default (no ARG): nanoGPT's CPU config (README "I only have a macbook"): 4 layers, 4 heads,
width 128, block 64, batch 12, dropout 0, 2000 steps, AdamW lr 1e-3 (100 warmup steps, cosine
to 1e-4), beta2 0.99, weight decay 0.1, clip 1.0.
  Command:  python -m train --config=experiments/configs/gpt_shakespeare.py --workdir=/tmp/gpt
  Hardware: 2-core CPU (this project's CI machine).
  Runtime:  about 80 s (32 ms/step; experiments/README.md).
  Result:   val loss 1.71 at step 2000 (seeds 1, 2: 1.71, 1.69). nanoGPT's PyTorch run of this
            config: 1.886; with nanoGPT's init (--config.model.init_std=0.02) ours: 1.87.

ARG `gpu`: nanoGPT's GPU config: 6 layers, 6 heads, width 384, block 256, batch 64, dropout 0.2,
5000 steps, lr 1e-3 with cosine to 1e-4, bf16 activations.
  Command:  python -m train --config=experiments/configs/gpt_shakespeare.py:gpu --workdir=/tmp/gpt_gpu
  Hardware: one GPU (nanoGPT: ~3 min on an A100). Not run on this project's CPU machines.
  Result:   nanoGPT reports val loss ~1.47.

ARG `teacher`: the teacher of experiments/configs/distill_gpt.py: 6 layers, 8 heads, width 256
(4.8M params, 6x the default's), block 64, batch 12 as the default, dropout 0.1, 5000 steps
(cosine to 1e-4 over them).
  Command:  python -m train --config=experiments/configs/gpt_shakespeare.py:teacher --workdir=workdirs/gpt_teacher
  Hardware: 2-core CPU. The full 5000 steps were not run (42-75 min at the 0.5-0.9 s/step
            measured below). The teacher of experiments/compare_compression.py is shortened to
            2000 steps (schedule included):
  Command:  python -m train --config=experiments/configs/gpt_shakespeare.py:teacher \
                --workdir=workdirs/compression/teacher --config.total_steps=2000 \
                --config.optimizer.decay_steps=2000
  Runtime:  26.1 min wall (Zen 4 host, `cpu family 25`, its 2 cores shared with two other
            training runs: 0.5-0.9 s/step), inside `compare_compression --train_missing`.
  Result:   val loss 1.717 at step 2000 (1.919 at step 1000): ahead of the 4 x 128 students of
            that comparison (1000 steps: 1.820 distilled, 1.925 from scratch;
            experiments/README.md), though not of the default 2000-step student (1.71).

ARG `tiny`: a smoke run (2 layers, width 32, 20 steps) in well under a minute on CPU.

Parallelism (any ARG): `--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2` on 8
devices combines data parallel, FSDP and Megatron tensor parallelism (`common.MEGATRON_RULES`;
`mesh.tensor` must divide `model.num_heads`). Whether a size fits before renting it:
  python -m train.compile --config=experiments/configs/gpt_shakespeare.py --devices=8 \
      --config.batch_size=16 --config.mesh.data=1 --config.mesh.fsdp=-1

Subword tokens instead of characters: --config.data.tokenizer=subword [--config.data.vocab_size=N]
(experiments/configs/gpt_multi30k.py runs GPT on Multi30k sentences that way).

Data: TFDS `tiny_shakespeare` from --config.data.data_dir or $TFDS_DATA_DIR; prepared without
TensorFlow on first use (--config.data.raw_dir=DIR holding input.txt, offline).
"""

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.family = 'gpt'
  c.seed = 1337
  c.total_steps = 2000
  c.batch_size = 12
  c.log_every = 100
  c.eval_every = 500
  c.eval_batches = 50            # 50 x 12 windows of 64 chars: ~38k validation tokens
  c.checkpoint_every = 1000
  c.sample_tokens = 256
  c.data.name = 'tiny_shakespeare'
  c.data.tokenizer = 'char'      # or 'subword' (byte-level BPE of vocab_size, train/text.py)
  c.data.vocab_size = 2000       # subword only
  c.model = dict(block_size=64, num_layers=4, num_heads=4, embed_dim=128, dropout=0.0,
                 dtype='float32')
  # Weight init std; None: 1/sqrt(embed_dim) (0.088 here). 0.02 is nanoGPT's (val ~1.87).
  c.model.init_std = config_dict.placeholder(float)
  c.model.attention = config_dict.placeholder(str)  # None: einsum on CPU, else XLA; or 'cudnn'
  c.model.dropout_bits = 32   # dropout masks: 32 bernoulli; 8 or 16 cheaper (models.layers.dropout)
  c.optimizer.update(lr=1e-3, schedule='cosine', warmup_steps=100, decay_steps=2000,
                     min_lr=1e-4, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
  c.sharding.rules = common.MEGATRON_RULES   # with --config.mesh.tensor=N
  c.sharding.divides = (('tensor', 'model.num_heads'),)
  if arg is None:
    return c
  if arg == 'gpu':
    c.total_steps = c.optimizer.decay_steps = 5000
    c.batch_size = 64
    c.eval_every = 250
    c.eval_batches = 200
    c.model.update(block_size=256, num_layers=6, num_heads=6, embed_dim=384, dropout=0.2,
                   dtype='bfloat16')
  elif arg == 'teacher':
    c.total_steps = c.optimizer.decay_steps = 5000
    c.model.update(num_layers=6, num_heads=8, embed_dim=256, dropout=0.1)
  elif arg == 'tiny':
    c.total_steps = c.optimizer.decay_steps = 20
    c.optimizer.warmup_steps = 2
    c.batch_size = 8
    c.log_every = 5
    c.eval_every = 10
    c.eval_batches = 2
    c.checkpoint_every = 10
    c.sample_tokens = 32
    c.model.update(block_size=32, num_layers=2, num_heads=2, embed_dim=32)
  else:
    raise ValueError(f'unknown ARG {arg!r} (use gpu, teacher or tiny)')
  return c
