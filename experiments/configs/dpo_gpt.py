r"""DPO on preference pairs judged by chrF: policy and frozen reference from the SFT run.

The policy starts from an instruction-tuned en->de run (config.init_from) and the reference is
loaded frozen from config.dpo.reference (the same run, usually); the loss is DPO's on the train
split's pairs (train/families/dpo.py), starting at ln 2. Write the pairs first (reward_gpt.py's
docstring, train/preferences.py).
  Command:  python -m train --config=experiments/configs/dpo_gpt.py --workdir=/tmp/dpo \
                --config.init_from=/tmp/sft --config.dpo.reference=/tmp/sft \
                --config.preferences.path=/tmp/pairs
Hyperparameters were chosen, not tuned (beta 0.1 as in the DPO paper; AdamW lr 5e-5, cosine to
lr/10, 600 steps of 32 pairs). The model section must equal the SFT run's.
  Result:   on the 8400 pairs and the SFT run of experiments/README.md ("Alignment to
            preferences"), judged by `experiments.compare_alignment`: 60.6% +- 1.8% win rate
            against SFT, chrF 33.4 -> 36.4, KL 3.8 nats; validation pairs: accuracy 0.573,
            loss 0.658 (< ln 2) at step 600. 18.1 min wall, 816 s user + 268 s system CPU,
            beside one or two other training runs. The command and the table are there.

ARG `tiny`: gpt_instruct.py:tiny's model, 4 steps of 8 pairs (tests).
"""

from experiments.configs import reward_gpt


def get_config(arg: str | None = None):
  c = reward_gpt.get_config(arg)
  c.family = 'dpo'
  c.dpo = dict(reference='', beta=0.1)
  c.optimizer.update(lr=5e-5, min_lr=5e-6)
  if arg == 'tiny':
    c.optimizer.update(lr=1e-3, min_lr=1e-4)
  return c
