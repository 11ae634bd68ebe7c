r"""Instruction fine-tuning of the gpt_base.py model: translation and synthetic word tasks.

Starts from a gpt_base.py run (--config.init_from=BASE, whose tokenizer it inherits) and trains
on train/instruct.py's tasks rendered with a template, the loss on the response tokens only.
ARG picks the method (comma-separated with `tiny`, or with `wide` for a gpt_base.py:parallel_wide
base, whose model is wider; and with `space` for config.data.space_starts_response: the prompt
ends with 'Response:' and the response starts with the space, train/instruct.py says why):
  full      every param trains (AdamW lr 1e-3)
  lora4     LoRA rank 4 (alpha 8) on the attention projections (qkv, proj); only the adapters
            train (lr 4e-3)
  lora8     the same at rank 8 (alpha 16): 1.56% of the base's params, under the 2% budget
  lora16    the same at rank 16 (alpha 32)
  dora8     lora8's adapters as DoRA's (config.lora.dora, models/lora.py): a learned magnitude
            per output column too, 1.69% of the base's params
  lora4mt   rank 4 (alpha 8) on the MLP's projections too, and rank 1 on the token table
            (tied to the output layer; models/lora.py's LoRAEmbed): a learned number per
            token, which doubles what adapters sort (below); 1.87% of a wide base's params
            (2.47% of the default base's: over the 2% budget there)
  prompt20  prompt tuning: 20 learned input vectors, the model frozen (lr 3e-2)
  (none)    as full
Tasks: --config.data.tasks='("en_de",)' for single-task; the default is all five, an equal mix.
  Command:  GENLAB_RAW_DATA=DIR python -m train --config=experiments/configs/gpt_instruct.py:lora4 \
                --workdir=/tmp/instruct_lora4 --config.init_from=/tmp/gpt_base
            python -m train.evaluate --workdir=/tmp/instruct_lora4   # task scores, forgetting
experiments/compare_adaptation.py runs every method and writes the comparison table; its run
(experiments/README.md, Zen 5 host) gave, on en_de alone: test2016 BLEU 19.0 (full), 5.9 (lora4),
11.3 (lora16), 1.5 (prompt20), with Tiny Shakespeare's LM loss up from 4.32 by 2.11, 0.81, 1.03
and 2.65 (the eight fine-tunings, their scoring and timing: 24 min wall on 2 cores).

Hyperparameters were chosen, not tuned (one pilot of full fine-tuning at lr 3e-4 and 1e-3):
800 steps of 32 rows (max 80 tokens), cosine decay to lr/10 after 50 warmup steps. The model
section must equal the base run's (its params restore by path).

LoRA pilots on en_de alone (not adopted; one run each, AMD Zen 3 host, December; base: a fresh
gpt_base.py run, val perplexity 50.2 as published; each 5.8-6.1 min wall, then `python -m
train.evaluate --workdir=W` for BLEU on 500 test2016 sentences and the Shakespeare LM loss):
  python -m train --config=experiments/configs/gpt_instruct.py:lora4 --workdir=W \
      --config.init_from=/tmp/gpt_base --config.data.tasks='("en_de",)' [overrides]
  as configured (lr 4e-3):                                        BLEU 5.9, LM loss 5.131
  --config.optimizer.lr=1.6e-2 --config.optimizer.min_lr=1.6e-3:   BLEU 7.3, LM loss 5.189
  the same and --config.lora.targets='(attn/(qkv|proj)|mlp/(fc|proj))$' (32,768 params,
  2.08% of the base):                                              BLEU 9.7, LM loss 5.631
  lr 1.6e-2 as above, attention adapters, and the token embeddings (tied to the output head)
  trained too: --config.trainable='(/lora/lora_[ab]|^model/wte/embedding)$' (780,288 params,
  49%; 4.9 min wall, 374 s user + 157 s system CPU):              BLEU 14.8, LM loss 11.50
  lr 1.6e-2 as above, attention adapters, and a low-rank update of the token table
  (models/lora.py's LoRAEmbed, tied output layer included): --config.lora.targets=
  '(attn/(qkv|proj)|wte)$' --config.lora.embed_rank=2 (24,544 params, 1.56%; 6.1 min wall,
  420 s user + 173 s system CPU):                                BLEU 7.1, LM loss 5.846
  the same with --config.lora.embed_rank=16 (110,336 params, 6.99%; 5.7 min wall):
                                                                 BLEU 11.1, LM loss 6.627
The first row reproduces compare_adaptation's lora4 row to the digit. Neither a 4x learning
rate nor adapters on the MLP closes the gap to full fine-tuning's 19.0. Training the embeddings
as well doubles LoRA's BLEU (7.3 -> 14.8), but a < 2% budget cannot train them whole; at this
learning rate they also wreck the Shakespeare LM (loss 11.50 against full fine-tuning's 6.43).
A low-rank update of the table does not recover it: rank 2 adds nothing (7.1), rank 16 gives
11.1 for 7% of the params, no more per param than attention adapters of rank 16 (11.3, 3.1%).
Nor is it only that the base never saw a translation. From a base pretrained on Multi30k's
pairs as documents (gpt_base.py:parallel, same model and steps; `python -m train
--config=experiments/configs/gpt_base.py:parallel --workdir=/tmp/gpt_base_parallel`, then the
commands above with ARG full or lora4 and --config.init_from=/tmp/gpt_base_parallel, nothing
else overridden; Zen 3):
  full   BLEU 22.4, LM loss 6.748, eval loss 2.985 / 2.700 / 2.532 / 2.463 at steps 200-800
         (5.2 min wall, 406 s user + 164 s system CPU)
  lora4  BLEU 11.5, LM loss 4.877, eval loss 3.083 / 3.044 / 3.019 / 3.006 (4.4 min wall)
Both gain (from the table's 19.0 and 5.9), the gap does not close: LoRA's validation loss flattens near
what the base already knows about translating, while full fine-tuning keeps fitting the 29k
training pairs with all 1.58M params. For LoRA to match, the fine-tuning data must teach the
base little beyond the format, which a 1.6M-param base trained for 20 minutes is far from.
A base trained 4x as long on the same corpus (gpt_base.py:parallel_long, 42 min; Zen 4, cpu
family 25) comes closer to that. From it (`--config.init_from=/tmp/gpt_base_long`, the pilot
command above with ARG full or lora4, nothing else overridden; Zen 4, nothing else running):
  full   BLEU 29.1, LM loss 6.235, eval loss 2.198 / 2.045 / 1.935 / 1.885 (4.2 min wall,
         328 s user + 116 s system CPU)
  lora4  BLEU 27.6, LM loss 4.540, eval loss 2.024 / 1.991 / 1.976 / 1.974 (3.4 min wall,
         248 s user + 104 s system CPU)
LoRA r=4 is now 1.5 BLEU behind full fine-tuning (10.9 from the parallel base above, 13.1 from
the default one), and ahead of it in validation loss at steps 200 and 400; experiments/README's
second adaptation table has every method from this base. With --config.lora.rank=8
--config.lora.alpha=16 (24,576 params, 1.56%; 3.3 min wall, 245 s user + 104 s system CPU):
  lora8  BLEU 28.2, LM loss 4.624, eval loss 2.028 / 1.982 / 1.973 / 1.971
0.97 BLEU behind full fine-tuning (29.14 against 28.17), but with --config.seed=1 for both
(another batch order and, for LoRA, adapter init; 3.3 and 4.0 min wall) 28.11 against 30.42:
2.31 behind. Over the two seeds LoRA r=8 (< 2% of the params) is 1.6 BLEU behind full
fine-tuning on en_de, and full fine-tuning itself moves by 1.3 BLEU between seeds. Two more
< 2% variants from this base, seed 0, neither closer (each 5.6-5.8 min wall beside one other
run): rank 3 on the MLP too, --config.lora.rank=3 --config.lora.alpha=6
--config.lora.targets='(attn/(qkv|proj)|mlp/(fc|proj))$' (24,576 params, 1.56%): BLEU 27.6,
LM loss 4.565; rank 8 with the LayerNorms trained too, --config.lora.rank=8
--config.lora.alpha=16 --config.trainable='(/lora/lora_[ab]|/(ln1|ln2|ln_f)/(scale|bias))$'
(26,880 params, 1.70%): BLEU 27.7, LM loss 4.758; against rank 8's 28.2 at the same seed.
With every bias trained as well (--config.trainable='(/lora/lora_[ab]|/bias|/scale)$', ARG
lora8; 31,488 params, 1.996%; from the long base rebuilt on Zen 5, below; 3.9 min wall beside
another run): BLEU 27.10, LM loss 4.819, validation loss 1.9995 at step 800 (rank 8 alone:
1.971).
A third seed, --config.seed=2, for full fine-tuning and rank 8 (6.7 and 5.6 min wall, run side
by side): 29.94 and 28.01. Over seeds 0 / 1 / 2 full fine-tuning scores 29.14 / 30.42 / 29.94
(mean 29.83) and rank 8 28.17 / 28.11 / 28.01 (mean 28.10): 1.7 BLEU behind, and LoRA's spread
is a tenth of full fine-tuning's. Its learning rate is not what holds it (rank 8, seed 0, each
5.6 min wall beside another run): --config.optimizer.lr=1.5e-3 --config.optimizer.min_lr=1.5e-4
BLEU 27.19; lr 1.2e-2, min_lr 1.2e-3: 27.63; against 28.17 at the configured 4e-3. Nor its
rank: one part of the model fine-tuned at full rank instead (ARG full, full fine-tuning's
lr 1e-3, seed 0, --config.trainable=REGEX; 8.1-8.7 min wall each, two at a time):
  '/attn/(qkv|proj)/(kernel|bias)$' (264,192 params: the matrices the adapters sit on): 28.08
  '/mlp/(fc|proj)/(kernel|bias)$' (526,848):                                           28.27
  '^model/wte/embedding$' (768,000; tied to the output layer):                         28.59
  '/(ln1|ln2|ln_f)/(scale|bias)$' (2,304):                                             23.77
Rank 8 does what a full-rank update of the same matrices does (28.17 against 28.08), and no one
part of the model trained alone comes within a point of training them all (29.14 at this
seed). My reading: full fine-tuning's lead is spread over the whole model, beyond what 2% of
the params in adapters on a few matrices can reach here. In the five-task mix no adapter
learns to reverse or sort the words. On reverse alone (--config.data.tasks='("reverse",)',
rank 8, seed 0; 3.7 min wall) rank 8 reaches 3.4% exact match with its validation loss still
falling fast (3.62 / 2.53 / 1.90 / 1.64 at steps 200-800): it learns to copy, slowly, and the
mix gives each task a fifth of the steps.
Training the position table as well does not make it copy: the mix with ARG lora4 and
--config.trainable='(/lora/lora_[ab]|^model/wpe/embedding)$' (28,672 params, 1.82%; 5.5 min
wall): count 99.4% (full fine-tuning's 99.4%, against rank 4's 88.4%), reverse and sort 0%,
en_de 23.7, de_en 28.4, LM loss 5.686.
Nor LoRA+ (Hayou, Ghosh and Yu 2024: B, the adapter matrix that starts at zero, trained at
lambda times A's learning rate; --config.lora.b_lr_ratio=LAMBDA, train/tune.py's lora_plus).
From the long base (--config.init_from=/tmp/gpt_base_long), rank 8, seed 0, one run each,
alone on a Zen 4 host (cpu family 25), 3.4-3.8 min wall each: the command above with ARG
lora4, --config.lora.rank=8 --config.lora.alpha=16 and --config.data.tasks='("en_de",)', then
train.evaluate, and:
  --config.lora.b_lr_ratio=16 (A at the configured 4e-3, B at 6.4e-2):   BLEU 26.80, LM loss 4.609
  --config.lora.b_lr_ratio=4:                                             BLEU 27.77, LM loss 4.726
  --config.lora.b_lr_ratio=16 --config.optimizer.lr=1e-3
  --config.optimizer.min_lr=1e-4 (A at 1e-3, B at 1.6e-2):                BLEU 26.24, LM loss 4.558
against 28.17 for plain rank 8 (validation loss at step 800: 1.976, 1.972 and 2.000 against
1.971). In the five-task mix (no tasks flag) with b_lr_ratio 4: en_de 24.2, de_en 28.5, reverse
and sort 0%, count 78.4%, LM loss 5.290 (plain rank 8: 25.0, 29.4, 0%, 0%, 93.2%, 5.105). A
larger learning rate for B, like a larger one for both, only lowers the scores here.
Nor a low-rank update of the token table beside the attention adapters (the token table was
the part that came closest trained alone, 28.59 above), within the 2% budget. From a long base
rebuilt on a Zen 5 host (cpu family 26; `python -m train
--config=experiments/configs/gpt_base.py:parallel_long --workdir=/tmp/gpt_base_long`: 28.3 min
wall beside ~5 min of unit tests, validation perplexity 20.14 at step 6400), en_de alone, one
run at a time with nothing else of ours running, 2.2-2.6 min wall each plus 10-14 s of
train.evaluate; that host gave plain rank 8's 28.17 and full fine-tuning's 29.14 at seed 0 to
the digit:
  python -m train --config=experiments/configs/gpt_instruct.py:lora8 --workdir=W \
      --config.init_from=/tmp/gpt_base_long --config.data.tasks='("en_de",)' \
      --config.lora.targets='(attn/(qkv|proj)|wte)$' --config.lora.embed_rank=1 [--config.seed=S]
  (30,704 params, 1.95%): BLEU 28.33 / 28.44 / 28.12 at seeds 0 / 1 / 2 (mean 28.30),
  LM loss 4.535 / 4.563 / 4.563
  ARG lora4 and --config.lora.embed_rank=2 instead (24,544 params, 1.56%), seed 0:
  BLEU 27.83, LM loss 4.432
Rank 1 on the table gains 0.2 BLEU on rank 8 alone (mean 28.30 against 28.10): 1.5 behind full
fine-tuning's 29.83, the goal still missed; moving rank from the attention to the table
(lora4 with embed_rank 2) loses more than it gains.
Nor is it the number of steps. The five-task mix for 3200 steps instead of 800, from the long
base, one run each on a Zen 4 host (cpu family 25), nothing else of ours running:
  python -m train --config=experiments/configs/gpt_instruct.py:ARG --workdir=W \
      --config.init_from=/tmp/gpt_base_long --config.total_steps=3200 \
      --config.optimizer.decay_steps=3200 --config.eval_every=800 --config.checkpoint_every=800
then train.evaluate. ARG lora8 (12.3 min wall): en_de 25.0, de_en 29.3, reverse 0%, sort 0.2%,
count 99.2%, LM loss 5.222 (validation loss 2.71 / 2.52 / 2.39 / 2.30 at steps 800-3200);
ARG full (15.1 min wall): en_de 28.9, de_en 33.5, reverse 94.8%, sort 71.6%, count 99.8%, LM
loss 8.926. Four times the steps lift LoRA's count to full fine-tuning's and nothing else,
while full fine-tuning learns to reverse and sort: the gap widens.
Nor DoRA's decomposition (Liu et al. 2024) of the same rank-8 attention adapters, which the
DoRA paper found to beat LoRA at equal rank. From the rebuilt long base above (Zen 5), en_de
alone, then train.evaluate, each run beside one other of ours (4.0-4.6 min wall; 2.4 beside
only seconds of unit tests):
  python -m train --config=experiments/configs/gpt_instruct.py:dora8 --workdir=W \
      --config.init_from=/tmp/gpt_base_long --config.data.tasks='("en_de",)' [--config.seed=S]
  (26,624 params, 1.69%): BLEU 27.87 / 27.75 / 27.82 at seeds 0 / 1 / 2 (mean 27.81), LM
  loss 4.688 / 4.779 / 4.709, validation loss at step 800 1.966 / 1.960 / 1.955
against plain rank 8's 28.10 (seed 0: validation loss 1.971). It fits the validation set a
little better and translates a little worse: 2.0 BLEU behind full fine-tuning's 29.83. In the
five-task mix (the same command without the tasks flag; 2.5 min wall alone): en_de 24.9, de_en
29.5, reverse 0%, sort 0%, count 95.2%, LM loss 5.366 (plain rank 8: 25.0, 29.4, 0%, 0%,
93.2%): DoRA does not make the adapters reverse or sort either.
A wider base closes the gap to under a point. gpt_base.py:parallel_wide is parallel_long at
width 192 (2.96M params; validation perplexity 19.3 against 20.1), where rank 8 on the
attention projections is 36,864 params, 1.25% of the base. From it, en_de alone, seeds 0 / 1 /
2, one run at a time (Zen 5 host, cpu family 26; nothing else of ours running, but for about
2 min of a unit test beside full fine-tuning's seed 1; 3.0-3.3 min wall for rank 8, 3.7-4.8
for full fine-tuning, plus 12-18 s of train.evaluate):
  python -m train --config=experiments/configs/gpt_instruct.py:ARG,wide --workdir=W \
      --config.init_from=/tmp/gpt_base_wide --config.data.tasks='("en_de",)' [--config.seed=S]
  ARG full:   BLEU 31.93 / 31.46 / 32.10 (mean 31.83), LM loss 6.006 / 6.060 / 5.871
  ARG lora8:  BLEU 31.04 / 31.18 / 31.33 (mean 31.18), LM loss 4.359 / 4.334 / 4.359
Rank 8 is 0.65 BLEU behind full fine-tuning over the three seeds (0.89, 0.28 and 0.77 seed by
seed), where from the 1.58M-param long base it was 1.7 behind: within the 1-point goal, with
1.25% of the params. Its validation loss is below full fine-tuning's at steps 200-600 and
above it at 800 (1.809 against 1.778 at seed 0). experiments/README's third adaptation table
has every method from this base, the five-task mix included.
ARG word space (config.data.space_starts_response) lets the adapters start to reverse: the
prompt then ends with 'Response:' and the response's first word is the token it is in the
input (train/instruct.py). From the wide base, the five-task mix, seed 0 (Zen 5 host, cpu
family 26; 3.2 min wall, beside seconds of unit tests; then train.evaluate):
  python -m train --config=experiments/configs/gpt_instruct.py:lora8,wide,space --workdir=W \
      --config.init_from=/tmp/gpt_base_wide
  reverse 19.6%, sort 1.0%, count 97.6%, en_de 26.2, de_en 29.5, LM loss 4.918
against 0%, 0%, 99.4%, 28.2 and 32.1 without the word (the third table's r=8 mix row).
Adapters on the MLP too, within the budget (ARG lora4,wide,space and
--config.lora.targets='(attn/(qkv|proj)|mlp/(fc|proj))$': 49,152 params, 1.66%; 3.3 min wall,
alone): reverse 22.6%, sort 3.6%, count 99.4%, en_de 27.3, de_en 31.3, LM loss 5.514.
Full fine-tuning gains more (reverse 94.6%, sort 30.8%): experiments/README's fourth table,
"The space before the response", has every method with it; the exact-match goal stays missed.
Each exact-match task alone, with the space, seed 0 (Zen 5 host, one run at a time, beside at
most seconds of unit tests; 3.0-3.9 min wall each, then train.evaluate):
  python -m train --config=experiments/configs/gpt_instruct.py:ARG,wide,space --workdir=W \
      --config.init_from=/tmp/gpt_base_wide --config.data.tasks='("reverse",)' [overrides]
and the same with '("sort",)':
  reverse  full 100.0%; lora8 92.0% (--config.optimizer.lr=1.2e-2 --config.optimizer.min_lr=
           1.2e-3: 91.4%); ARG lora4 with the MLP's targets above (49,152 params) 95.8%;
           lora4mt 96.2%
  sort     full 86.6%; lora8 23.2%; lora8 with rank 1 on the token table
           (--config.lora.targets='(attn/(qkv|proj)|wte)$' --config.lora.embed_rank=1; 43,056
           params, 1.46%) 48.2%, with rank 4 there (--config.lora.embed_rank=4; 61,632, 2.08%:
           over the budget) 65.4%; lora4mt 57.0%
lora4mt's runs here, the longer ones below included, were ARG lora4 with
--config.lora.targets='(attn/(qkv|proj)|mlp/(fc|proj)|wte)$' --config.lora.embed_rank=1, the
settings ARG lora4mt names. A learned number per token doubles what the adapters sort (23.2
-> 48.2%), presumably as the words' alphabetical order is not in the frozen table for adapters
on the projections to read off. Trained on one synthetic task, every run here wrecks the
Shakespeare LM (loss 7.8-11.3, against 3.89 before). With more steps (--config.total_steps=N
--config.optimizer.decay_steps=N --config.eval_every=N/4 --config.checkpoint_every=N/4, the
same seed): sort at N=3200, lora4mt 83.8% and full 96.2% (15.3 and 14.3 min wall; about 2 min of
unit tests beside the first), 12.4 points apart (29.6 at 800 steps); reverse at N=1600,
lora4mt 98.4% and full 100.0% (7.2 and 7.6 min wall, alone): 1.6 points apart, within the
2-point goal on this task, with twice the steps.
experiments/README's fifth table, "Each exact-match task alone", has the 800-step runs of
full, lora8 and lora4mt, and the three in the five-task mix, where lora4mt's BLEU is full
fine-tuning's at seed 0 (en_de 28.33 and 28.28, de_en 32.38 and 32.50). The mix over seeds 0 /
1 / 2 (ARG full,wide,space or lora4mt,wide,space, --config.init_from=/tmp/gpt_base_wide
[--config.seed=S], nothing else overridden; seed 0's runs are the table's; seeds 1 and 2 one
at a time, 3.8-3.9 min wall, lora4mt's seed 1 4.3 beside unit tests; then train.evaluate):
  en_de    full 28.28 / 28.03 / 29.05 (mean 28.45), lora4mt 28.33 / 27.81 / 27.41 (27.85)
  de_en    full 32.50 / 31.78 / 33.03 (mean 32.44), lora4mt 32.38 / 31.09 / 31.00 (31.49)
  reverse  full 94.6 / 93.4 / 92.6%, lora4mt 26.6 / 25.6 / 24.4%
  sort     full 30.8 / 37.4 / 36.0%, lora4mt 3.0 / 3.6 / 2.2%
  LM loss  full 7.016 / 7.006 / 7.158, lora4mt 5.436 / 5.707 / 5.392
lora4mt (1.87% of the params) is 0.60 BLEU behind on en_de and 0.95 on de_en over the three
seeds: within the 1-BLEU goal on the means, not at every seed (seed 2: 1.64 and 2.03 behind).
Nor is it only the adapters' rank that keeps them from reversing and sorting in the mix: one
part of the model fine-tuned at full rank falls short as well. ARG full,wide,space, seed 0, the
mix, --config.init_from=/tmp/gpt_base_wide --config.trainable=REGEX (Zen 5 host, one run at a
time, 3.1-3.5 min wall each; then train.evaluate), against full fine-tuning's reverse 94.6%,
sort 30.8% (seed 0 above):
  '/attn/(qkv|proj)/(kernel|bias)$' (592,896 params, 20%): reverse 58.2%, sort 8.6%, count
      99.6%, en_de 28.18, de_en 31.28, LM loss 5.277
  '/mlp/(fc|proj)/(kernel|bias)$' (1,183,488, 40%):        reverse 36.0%, sort 13.4%, count
      98.8%, en_de 28.41, de_en 32.49, LM loss 5.526
  '^model/wte/embedding$' (1,152,000, 39%; tied output):   reverse 0.0%, sort 0.4%, count
      91.0%, en_de 27.68, de_en 31.18, LM loss 6.272
  '^model/(blocks|wpe|ln_f)/' (all but the token table, 1,804,416, 61%): reverse 93.2%, sort
      20.2%, count 99.4%, en_de 28.37, de_en 33.33, LM loss 5.971
Reversing takes the attention and the MLPs together (58.2 and 36.0 apart, 93.2 together), and
sorting the token table as well (20.2 without it, 30.8 with): what full fine-tuning changes to
learn these tasks in a fifth of 800 steps is spread over the attention, the MLPs and, for
sorting, the token table; adapters of under 2% of the params on them learn it far more slowly.
"""

from experiments.configs import gpt_base

METHODS = {
    'full': dict(trainable='all', lr=1e-3),
    'lora4': dict(trainable='lora', lr=4e-3, rank=4, alpha=8.0),
    'lora8': dict(trainable='lora', lr=4e-3, rank=8, alpha=16.0),
    'lora16': dict(trainable='lora', lr=4e-3, rank=16, alpha=32.0),
    'dora8': dict(trainable='lora', lr=4e-3, rank=8, alpha=16.0, dora=True),
    'lora4mt': dict(trainable='lora', lr=4e-3, rank=4, alpha=8.0,
                    targets=r'(attn/(qkv|proj)|mlp/(fc|proj)|wte)$', embed_rank=1),
    'prompt20': dict(trainable='prompt', lr=3e-2, prompt_tokens=20),
}
LORA_TARGETS = r'attn/(qkv|proj)$'


def get_config(arg: str | None = None):
  words = [w for w in (arg or '').split(',') if w]
  tiny, wide, space = 'tiny' in words, 'wide' in words, 'space' in words
  methods = [w for w in words if w not in ('tiny', 'wide', 'space')]
  if len(methods) > 1 or (methods and methods[0] not in METHODS) or (tiny and wide):
    raise ValueError(f'ARG {arg!r}: use one of {", ".join(METHODS)} (and tiny or wide, '
                     'and space)')
  method = METHODS[methods[0] if methods else 'full']
  c = gpt_base.get_config('tiny' if tiny else None)
  if wide:  # the model of gpt_base.py:parallel_wide
    c.model.update(gpt_base.WIDE)
  c.family = 'gpt_instruct'
  c.method = methods[0] if methods else 'full'
  c.data.tasks = ('en_de', 'de_en', 'reverse', 'sort', 'count')
  c.data.template = 'Instruction: {instruction}\nInput: {input}\nResponse: {response}'
  c.data.space_starts_response = space   # ARG word space; train/instruct.py says why
  c.data.max_len = 80
  c.data.held_out = 500
  c.data.task_seed = 0
  c.data.max_response_tokens = 48
  c.data.score_examples = 500
  c.data.forgetting_source = 'tiny_shakespeare'
  c.trainable = method['trainable']
  c.model.prompt_tokens = method.get('prompt_tokens', 0)
  if 'rank' in method:
    c.lora.update(rank=method['rank'], alpha=method['alpha'],
                  targets=method.get('targets', LORA_TARGETS),
                  embed_rank=method.get('embed_rank', 0), dora=method.get('dora', False))
  c.total_steps = c.optimizer.decay_steps = 800
  c.batch_size = 32
  c.log_every = 50
  c.eval_every = 200
  c.eval_batches = 10
  c.checkpoint_every = 200
  c.optimizer.update(lr=method['lr'], min_lr=method['lr'] / 10, warmup_steps=50,
                     weight_decay=0.0)
  if tiny:
    c.data.tasks = ('en_de', 'reverse')
    c.data.max_len = 88
    c.data.held_out = 8
    c.data.score_examples = 8
    c.data.max_response_tokens = 8
    c.total_steps = c.optimizer.decay_steps = 6
    c.optimizer.warmup_steps = 1
    c.batch_size = 8
    c.log_every = 2
    c.eval_every = 3
    c.eval_batches = 1
    c.checkpoint_every = 3
    c.model.prompt_tokens = min(c.model.prompt_tokens, 4)
  return c
