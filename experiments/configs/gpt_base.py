r"""A small foundation model for the adaptation experiments: GPT on three corpora, one vocabulary.

Pretrained with the byte-level BPE tokenizer (6000 tokens, trained on the train splits) on
Multi30k English and German sentences plus Tiny Shakespeare's speeches, each document followed
by [EOS] and the stream cut into random windows of 128 tokens. Instruction fine-tuning
(gpt_instruct.py, experiments/compare_adaptation.py) starts from this run with
--config.init_from and inherits its tokenizer.
  Command:  GENLAB_RAW_DATA=DIR TFDS_DATA_DIR=TFDS python -m train \
                --config=experiments/configs/gpt_base.py --workdir=/tmp/gpt_base
            (DIR holds multi30k/*.gz and tiny_shakespeare; TFDS a prepared TFDS data_dir)
  Hardware: 2-core CPU, Zen 5 (cpu family 26).
  Runtime:  11.9 min wall; 452 s user + 231 s system CPU time (1600 steps of 24 x 128 tokens).
  Result:   validation perplexity 50.2 per subword token over the mix at step 1600 (95.1 / 63.6
            / 53.4 at steps 400 / 800 / 1200); 1.58M params (4 layers, width 128). Its samples
            (samples/step_0001600.txt) are sentence-shaped English or German with garbled
            content, e.g. "Ein Baseballspieler mit rotem Hut spielt Stästange vor."

ARG `parallel`: the same model and steps on a bilingual corpus: every Multi30k train pair as
one document in each direction (English, newline, German; and German, newline, English) instead
of the two languages' sentences apart, plus Tiny Shakespeare. A base that has seen translations
but never the instruction template, as a web-crawled foundation model has. One run (AMD Zen 3
host, 2 cores, beside ~3 min of unit tests): 14.3 min wall, 1020 s user + 436 s system CPU;
validation perplexity 37.4 at step 1600 (over pair documents: not comparable with the 50.2
above). What it changes for fine-tuning (gpt_instruct.py's docstring): en->de BLEU 22.4 (full)
and 11.5 (lora4), against 19.0 and 5.9 from the default base; the gap stays.
ARG `parallel_long`: `parallel` trained 4x as long (6400 steps, the cosine decay stretched to
match), so that fine-tuning on the same pairs has less left to teach it.
One run (Zen 4 host, cpu family 25, 2 cores, nothing else running):
  python -m train --config=experiments/configs/gpt_base.py:parallel_long \
      --workdir=/tmp/gpt_base_long
42.2 min wall, 3259 s user + 1219 s system CPU; validation perplexity 32.5 / 23.4 / 21.0 / 20.1
at steps 1600 / 3200 / 4800 / 6400 (train loss 2.45 against validation 3.00 at the end: it
starts to overfit). What it changes for fine-tuning: experiments/README's second adaptation
table (en_de BLEU: full fine-tuning 29.1, LoRA r=4 27.6).
ARG `parallel_wide`: `parallel_long` at 1.5x the width (192, 6 heads of 32; 2.96M params
against 1.58M), so that the base knows more of what fine-tuning teaches. One run (Zen 5 host,
cpu family 26, 2 cores, nothing else of ours running):
  python -m train --config=experiments/configs/gpt_base.py:parallel_wide \
      --workdir=/tmp/gpt_base_wide
37.4 min wall, 2691 s user + 1287 s system CPU; validation perplexity 27.6 / 20.9 / 19.5 / 19.3
at steps 1600 / 3200 / 4800 / 6400 (train loss 2.05 at the end: it overfits more than
parallel_long). Fine-tune it with gpt_instruct.py's ARG word `wide` (its model section), or
with experiments/compare_adaptation.py --base, which takes the base run's; what it changes for
fine-tuning: experiments/README's third adaptation table.
ARG `tiny`: a smoke run (2 layers, width 32, 96 positions, vocab 1000, 20 steps).
"""

from experiments.configs import gpt_shakespeare

# ARG parallel_wide's model: 1.5x the width (head size 32 as before), ~1.9x the params.
WIDE = dict(embed_dim=192, num_heads=6)


def get_config(arg: str | None = None):
  c = gpt_shakespeare.get_config('tiny' if arg == 'tiny' else None)
  c.seed = 0
  c.data.name = 'mix'
  c.data.sources = ('multi30k:en', 'multi30k:de', 'tiny_shakespeare')
  c.data.tokenizer = 'subword'
  c.data.vocab_size = 6000
  c.sample_tokens = 64
  if arg in ('parallel', 'parallel_long', 'parallel_wide'):
    c.data.sources = ('multi30k:en-de', 'multi30k:de-en', 'tiny_shakespeare')
  if arg in (None, 'parallel', 'parallel_long', 'parallel_wide'):
    c.total_steps = c.optimizer.decay_steps = 1600 if arg in (None, 'parallel') else 6400
    c.batch_size = 24
    c.eval_every = 400
    c.eval_batches = 20
    c.checkpoint_every = 400
    c.optimizer.update(lr=1.5e-3, warmup_steps=100, weight_decay=0.1)
    c.model.update(block_size=128, num_layers=4, num_heads=4, embed_dim=128, dropout=0.0)
    if arg == 'parallel_wide':
      c.model.update(WIDE)
  elif arg == 'tiny':
    c.data.vocab_size = 1000
    c.model.block_size = 96
  else:
    raise ValueError(f'unknown ARG {arg!r} (use parallel, parallel_long, parallel_wide or tiny)')
  return c
