r"""RLHF with PPO and a KL penalty: policy and reference from the SFT run, a frozen reward model.

The policy starts from an instruction-tuned en->de run (config.init_from; a value head is
added at zero), the reference is loaded frozen from config.rlhf.reference (the same run,
usually) and the reward from config.rlhf.reward (a reward_gpt.py run). Each step samples
responses to 16 train prompts of the pairs file inside the run and takes PPO updates on them
(train/families/rlhf.py). Train the reward model first (reward_gpt.py's docstring).
  Command:  python -m train --config=experiments/configs/rlhf_gpt.py --workdir=/tmp/ppo \
                --config.init_from=/tmp/sft --config.rlhf.reference=/tmp/sft \
                --config.rlhf.reward=/tmp/reward --config.preferences.path=/tmp/pairs \
                [--config.rlhf.beta=0.01]
Hyperparameters were chosen, not tuned, and the run is short because a step is costly on a
CPU (a rollout of 16 prompts x 48 tokens, three forward passes, two updates): beta 0.1 (fixed;
--config.rlhf.target_kl=T > 0 adapts it after every rollout to hold the KL near T nats, as
train/families/rlhf.py describes, with gain --config.rlhf.kl_gain, default 0.1), clip
0.2, 2 PPO epochs per rollout, GAE lambda 0.95, value coefficient 0.5, AdamW lr 1e-4 (cosine
to 1e-5), 100 steps of 16 rollouts.
  Result:   on the pairs, SFT and reward runs of experiments/README.md ("RLHF with PPO"),
            judged by `experiments.compare_alignment`: win rate against SFT 55.1% +- 1.7%
            (beta 0.1), 57.3% (0.05), 54.2% (0.2), and 47.3% at beta 0.005, where the reward
            model's score is highest (0.979 vs SFT's 0.309) and the judge's chrF falls below
            SFT's: reward hacking. 1.0-1.1 min wall per run (89-95 s user + 15-16 s system
            CPU, alone, on a Zen 5 host). The commands and the table are there.
  Pilot:    --config.rlhf.group_size=4 (4 answers to each of 4 prompts per step, the reward
            model's score centred by the leave-one-out mean of the others) at beta 0.05,
            against group_size 1 on the same freshly rebuilt chain (experiments/README.md,
            "RLHF with PPO"): win rate 54.8% +- 1.6 against 55.4% +- 1.7; no gain.
            --config.rlhf.reward=RUN0,RUN1,RUN2 (an ensemble of three reward runs that
            differ only in their seed, scored by the mean) at beta 0.05: 54.9% +- 1.7 against
            57.3% +- 1.6 with RUN0 alone; at beta 0.005 no less reward hacking (47.8% vs
            47.3%); no gain (the same section). A reward model on 3x the pairs (24000) at beta
            0.05: 55.9% +- 1.7; no gain either.
            On the longer-trained chain of that section (its $A and $PPO), against the
            ensemble of the two clear-pair reward models there (60.5 / 57.3 / 59.3% over PPO
            seeds 0 / 1 / 2, mean 59.0), three more, none better: the same with
            --config.batch_size=32 (twice the rollouts per step; 3.3-3.5 min wall a run, alone):
            59.3 / 56.5 / 57.4% (mean 57.7); a third member (the section's reward command with
            --config.seed=2; validation accuracy 0.638 / 0.606 / 0.606): 56.4 / 55.9 / 59.3%
            (mean 57.2); --config.rlhf.gae_lambda=1.0 (each token's advantage its whole return
            to go less its value; 1.8-3.0 min wall a run): 59.2 / 56.6 / 59.4% (mean 58.4).
            A critic that learns faster, --config.rlhf.value_lr_scale=10.0 (the value head's
            updates x10; value loss at step 100 0.21 against 0.38; 1.9-2.0 min wall a run,
            alone): 60.3 / 57.2 / 60.8% (mean 59.4, within the seeds' spread of 59.0); seeds
            3 / 4 / 5 (--config.seed), x10 against x1: 56.5 / 58.1 / 58.5% against 58.2 / 57.3 /
            56.6%, so over six seeds 58.6% against 58.2%: no gain beyond the noise; x30:
            60.2 / 54.4 / 57.9% (mean 57.5); x10 with GAE lambda 1: 58.3 / 57.8 / 57.6%
            (mean 57.9); x10 for twice the steps (--config.total_steps=200
            --config.optimizer.decay_steps=200; 3.5-3.8 min wall a run): 57.6 / 56.7 / 55.6%
            (mean 56.6, KL 5.9-7.3 nats: further from SFT, no nearer the judge).
            Pairs that set a sharper sample against the temperature-1 one, since the judge
            prefers the SFT model sampled at 0.8 (63.2%): `python -m train.preferences
            --sft=$A/sft --out=$A/pairs_t07 --num_prompts=8000 --num_held_out=200
            --second_temperature=0.7` (6:02 wall, 608 s user CPU; the judge prefers the
            temperature-0.7 response in 64.6% of the train pairs, chrF 52.4 against 45.9), two
            reward models on them (reward_gpt.py with --config.preferences.path=$A/pairs_t07,
            seeds 0 and 1; 3.5 min wall each; validation accuracy 0.538 / 0.575 / 0.569 and
            0.600 / 0.619 / 0.569, where always picking the sharper response scores 0.622: the
            reward model does not learn what sharpness is worth), and PPO against the two
            (with --config.preferences.path=$A/pairs_t07 as well: the same train prompts):
            58.2 / 55.0 / 53.2% (mean 55.5); with both reward models on the clear pairs of
            these (--config.preferences.min_confidence=0.7310585786300049: 5438 of the 8000;
            validation accuracy 0.600 / 0.581 / 0.563 and 0.594 / 0.600 / 0.600): 59.3 / 55.1 /
            58.1% (mean 57.5).
            Nor another beta, fixed or adaptive (against the ensemble of the two clear-pair
            reward models, seeds 0 / 1 / 2, each run 1.8-2.5 min wall on a Zen 4 host, cpu
            family 25; the ensemble's command with --config.rlhf.beta=B in place of
            0.05): beta 0.02: 59.9 / 54.7 / 58.4% (mean 57.7, KL 5.5-6.3 nats); 0.03: 59.6 /
            56.6 / 58.1% (58.1); 0.05, rerun: 60.5 / 57.3 / 59.3% (59.0, as above to the
            digit); 0.08: 60.3 / 57.5 / 58.1% (58.6); 0.12: 61.1 / 54.7 / 58.8% (58.2, KL
            2.2-3.0). An adaptive beta from 0.05 holding 4 nats (--config.rlhf.target_kl=4.0,
            gain 0.1; it fell to 0.036 by step 20 while the KL rose, then climbed again and
            ended at 0.045-0.074; KL at test 3.8-4.7): 57.9 / 58.9 / 57.8% (58.2). From 0.02
            to 0.12 the means stay within 1.3 points of each other, less than one run's spread
            over seeds.
            Nor more PPO epochs or another policy learning rate, on the chain rebuilt on a Zen 5
            host (cpu family 26; gpt_base.py:parallel_long and the SFT as in
            gpt_instruct.py's docstring, whose full fine-tune at seed 0 is the SFT; the pairs,
            both clear-pair reward models and the ensemble's PPO runs at seeds 0 and 3-5
            reproduced the figures above to the digit: 82.2% verdicts, validation accuracy
            0.569 / 0.581 / 0.606 and 0.619 / 0.600 / 0.606, 60.5% and 58.2 / 57.3 / 56.6%;
            each PPO run 1.1-1.6 min wall, alone): --config.rlhf.ppo_epochs=4 (the config's
            2): 60.7 / 56.7 / 58.1% (mean 58.5); --config.optimizer.lr=2e-4
            --config.optimizer.min_lr=2e-5 (twice the config's): 54.0 / 48.5 / 55.1% (mean
            52.5, KL 6.6-8.7 nats); lr 2.5e-5, min_lr 2.5e-6: 55.6 / 58.9 / 57.0% (mean 57.2);
            lr 5e-5, min_lr 5e-6: 60.6 / 60.5 / 58.9% (mean 60.0, KL 2.5-2.6), and at seeds
            3 / 4 / 5 59.1 / 59.7 / 58.1%: over six seeds 59.5% against the config's 58.2%
            (1.9-2.6 nats from SFT, the config's runs scored here 3.5-4.6), the best six-seed
            mean of any setting here and still under 60%. The learning rate was picked on the
            same test prompts it is scored on, so its 1.3 points likely overstate what it is
            worth; the config keeps 1e-4, which every figure above used.
            Chosen again on prompts none of these figures uses, the pairs file's validation
            prompts (`compare_alignment --split=validation`: 198 of them, which no run trains
            on), the same runs and three more at lr 5e-5, seeds 0 / 1 / 2 (each 1.2-3.9 min
            wall, beside one other run of ours), win rate against SFT on validation: the
            config's lr 1e-4, seeds 0 / 3 / 4 / 5: 58.0 / 55.0 / 52.7 / 56.5% (mean 55.6); lr
            5e-5, seeds 0-5: 57.3 / 57.6 / 57.4 / 57.1 / 55.5 / 57.8% (57.1; 57.4 over seeds
            0-2); lr 5e-5 with --config.rlhf.beta=0.03: 58.9 / 56.7 / 54.9% (56.8); with
            --config.rlhf.value_lr_scale=10.0: 57.2 / 57.8 / 56.1% (57.0); for 200 steps
            (--config.total_steps=200 --config.optimizer.decay_steps=200): 59.0 / 57.7 /
            55.2% (57.3); with --config.batch_size=32 (twice the rollouts per step; 2.0-2.6
            min wall a run, mostly alone): 58.7 / 57.0 / 57.7% (57.8), and at seeds 3 / 4 / 5
            56.8 / 59.0 / 55.3% (57.4 over six seeds, against 57.1 for lr 5e-5 alone: within
            the seeds' spread). Validation picks lr 5e-5, 1.4 points above the config's over
            their four shared seeds, and marginally lr 5e-5 with batch 32. Their test figures:
            lr 5e-5 the 59.5% above; with batch 32 60.4 / 60.4 / 60.2 / 57.4 / 59.8 / 58.8% at
            seeds 0-5 (mean 59.5%, 60.3 over seeds 0-2; KL 2.4-2.7 nats). The goal stays
            missed: no six-seed mean passes 60%.
            Each set judged by `python -m experiments.compare_alignment
            --pairs=$A/pairs --sft=$A/sft --reward=$A/reward_c73 --ppo=its runs
            [--split=validation]`.
            Nor a wider SFT model. From gpt_base.py:parallel_wide (width 192; its full
            fine-tune on en_de, gpt_instruct.py:full,wide at seed 0, is the SFT: its own
            docstring's command, workdir $SFT), the chain rebuilt with the settings chosen on
            validation above, decided before the runs (Zen 5 host, cpu family 26), each
            command as in experiments/README.md's "RLHF with PPO" with $SFT for $A/sft and
            --config.model.embed_dim=192 --config.model.num_heads=6 on the train commands:
            the pairs (7.5 min wall; 83.3% of the verdicts for the higher chrF), the two
            clear-pair reward models, seeds 0 and 1 (8.1-8.4 min wall each beside the unit
            tests; validation accuracy 0.637 / 0.606 / 0.613 and 0.588 / 0.613 / 0.606), and
            $PPO against the two (--config.rlhf.reward=R0,R1) with
            --config.optimizer.lr=5e-5 --config.optimizer.min_lr=5e-6 --config.batch_size=32
            at seeds 0-5 (2.8-3.0 min wall each, alone); then compare_alignment with
            --sft=$SFT --reward=R0. Judged on the 199 test prompts (SFT chrF 47.2, BLEU 21.0
            against the long-base SFT's 43.9 and 18.3): 55.8 / 56.6 / 54.3 / 55.8 / 56.1 /
            57.2% (mean 56.0, KL 1.7-2.1 nats): below the narrower chain's 59.5%, with a
            reward model no more accurate (0.61 at step 600).
            Nor the SFT model's own likelihood in the return (--config.rlhf.reference_logp_weight
            =w, the reference being the SFT model). On this wide chain's validation pairs,
            `python -m experiments.pair_accuracy --pairs=$A/pairs --sft=$SFT --reward=R0,R1`
            (198 pairs, 15 s wall): the SFT model's mean token log-prob agrees with the
            judge's verdict on 60.1% +- 3.5 of them, the two reward models' mean score on
            60.6%, their sum with w = 0.5 / 1 / 2 / 4 on 63.6 / 64.6 / 67.2 / 64.6%, the higher
            sentence chrF (the judge before its noise) on 80.8%. On the default chain (the
            commands of experiments/README.md's "RLHF with PPO" in /tmp/al, rebuilt on a Zen 5
            host: base validation perplexity 50.2, 76.4% verdicts, reward accuracy 0.646 /
            0.620 / 0.599, as there), `--pairs=/tmp/al/pairs --sft=/tmp/al/sft
            --reward=/tmp/al/reward`: likelihood 55.0%, reward model 59.0%, the sum 62.0 /
            62.0 / 59.0 / 56.5%, chrF 72.5%. PPO on the wide chain with the settings above and
            w = 2 or 8, seeds 0-2 (2.7-3.2 min wall a run, mostly alone), judged on the 198
            validation prompts (`compare_alignment --split=validation`): w = 2 58.4 / 57.5 /
            57.5% (mean 57.8), w = 8 52.1 / 55.1 / 52.7% (53.3), against 58.6 / 58.7 / 58.1%
            (58.5) for the same runs without it. The term sharpens the policy (per-token
            entropy of the rollouts from 1.46-1.57 at step 5 to 1.26-1.29 at step 100 with w =
            2, 1.13-1.20 with w = 8; 1.54 -> 1.51 without, seed 0) and raises BLEU (22.3-22.4
            with w = 2, 21.1-22.5 with w = 8, against SFT's 19.3 and 18.0-19.9 without), but
            drops words the SFT model finds unlikely: answers of 14.7-14.8 tokens at w = 8
            (SFT 17.7), which chrF, weighing recall, does not reward. Neither weight beat
            the runs without it on validation, so neither went to the test prompts.
            Nor the settings chosen on validation above on the default chain (the /tmp/al
            chain just named: $PPO with $A=/tmp/al against its two clear-pair reward models,
            the reward command with --config.preferences.min_confidence=0.7310585786300049
            at seeds 0 and 1, validation accuracy 0.646 / 0.552 / 0.583 and 0.620 / 0.594 /
            0.604; --config.optimizer.lr=5e-5 --config.optimizer.min_lr=5e-6
            --config.batch_size=32, seeds 0-5, 2.0-2.1 min wall each, alone; compare_alignment
            with --reward=/tmp/al/reward_c73): SFT chrF 33.38 / BLEU 10.57 as in the README's
            table, PPO 57.3 / 55.6 / 56.3 / 57.1 / 56.2 / 56.7% (mean 56.5, KL 2.7-3.3 nats),
            against 57.3% for the table's single run at the config's lr 1e-4 and beta 0.05.
The model section must equal the SFT run's.

ARG `tiny`: gpt_instruct.py:tiny's model, 4 steps of 8 rollouts of 8 tokens (tests).
"""

from experiments.configs import reward_gpt


def get_config(arg: str | None = None):
  c = reward_gpt.get_config(arg)
  c.family = 'rlhf'
  del c.preferences['min_confidence']   # PPO trains on the pairs file's prompts, not its pairs
  c.rlhf = dict(reward='', reference='', beta=0.1, clip=0.2, ppo_epochs=2, gae_lambda=0.95,
                vf_coef=0.5, temperature=1.0, max_new_tokens=48, prompt_len=60,
                group_size=1, value_lr_scale=1.0,   # value head's lr / the policy's
                reference_logp_weight=0.0,   # > 0: + w * the reference's mean token log-prob
                target_kl=0.0, kl_gain=0.1)   # target_kl > 0: beta adapts to hold that KL
  c.batch_size = 16
  c.total_steps = c.optimizer.decay_steps = 100
  c.optimizer.update(lr=1e-4, min_lr=1e-5, warmup_steps=4)
  c.log_every = 5
  c.eval_every = 40
  c.checkpoint_every = 10
  c.eval_batches = 2
  if arg == 'tiny':
    c.rlhf.update(max_new_tokens=8, prompt_len=64)
    c.optimizer.update(lr=1e-3, min_lr=1e-4, warmup_steps=1)
    c.total_steps = c.optimizer.decay_steps = 4
    c.batch_size = 8
    c.log_every = 2
    c.eval_every = c.checkpoint_every = 2
    c.eval_batches = 1
  return c
