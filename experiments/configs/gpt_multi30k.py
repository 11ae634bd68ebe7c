r"""GPT (decoder-only LM) on Multi30k English sentences with the subword tokenizer.

The decoder-only counterpart of bert_multi30k.py: the same sentences, the same byte-level BPE
vocabulary size (4000, trained on the train split) and the same network size (4 layers, 4
heads, width 128, dropout 0.1), so experiments/README.md can set the three transformer shapes
side by side. Each sentence is followed by [EOS] and the stream is cut into random windows of
64 tokens (nanoGPT's batching), so a window spans sentence boundaries.
  Command:  GENLAB_RAW_DATA=DIR python -m train --config=experiments/configs/gpt_multi30k.py \
                --workdir=/tmp/gpt_m30k      (DIR holds multi30k/*.gz)
  Hardware: 2-core CPU, Zen 4 (cpu family 25), shared with two other engineers' niced jobs.
  Runtime:  6.6 min wall; 462 s user + 191 s system CPU time (1200 steps of 32 x 64 tokens).
  Result:   val perplexity 34.2 per subword token at step 1200 (51.0 / 37.3 at steps 400 / 800).
            The run's own samples at step 1200 (samples/step_0001200.txt) read like "A group of
            dogs playing the ball in a field." between garbled ones.
  Sample:   python -m train.sample --workdir=/tmp/gpt_m30k --prompt="A man in" --max_new_tokens=60

ARG `tiny`: a smoke run (2 layers, width 32, vocab 300, 20 steps).

Data: Multi30k task 1 raw files from --config.data.raw_dir=DIR (or DIR/multi30k), else
$GENLAB_RAW_DATA/multi30k.
"""

from experiments.configs import gpt_shakespeare


def get_config(arg: str | None = None):
  c = gpt_shakespeare.get_config('tiny' if arg == 'tiny' else None)
  c.seed = 0
  c.data.name = 'multi30k'
  c.data.language = 'en'
  c.data.tokenizer = 'subword'
  c.data.vocab_size = 4000
  c.eval_batches = 30               # 30 x 32 windows of 64 tokens: ~61k of val's ~17k tokens,
  c.sample_tokens = 64              # with overlap (random windows)
  if arg is None:
    c.total_steps = c.optimizer.decay_steps = 1200
    c.batch_size = 32
    c.eval_every = 400
    c.checkpoint_every = 400
    c.optimizer.update(lr=1.5e-3, warmup_steps=100, weight_decay=0.1)
    c.model.update(block_size=64, num_layers=4, num_heads=4, embed_dim=128, dropout=0.1)
  elif arg == 'tiny':
    c.data.vocab_size = 300
    c.eval_batches = 2
  else:
    raise ValueError(f'unknown ARG {arg!r} (use tiny)')
  return c
