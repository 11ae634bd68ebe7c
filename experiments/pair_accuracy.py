r"""How often a scorer agrees with the hidden judge on held-out preference pairs.

  python -m experiments.pair_accuracy --pairs=PAIRS --sft=SFT --reward=REWARD[,REWARD2,...] \
      [--weights=0.5,1,2,4] [--split=validation]

Scores both responses of each pair of the pairs file's split (validation by default: no run
trains on it) and counts the pairs whose chosen response (the judge's verdict) scores higher.
Scorers: the reward model(s) (an ensemble's mean score, as PPO sees it), the SFT model's mean
token log-probability of the response (the log-probability of the response's tokens and its
[EOS], averaged over them: a reward model with no training at all), their sum with each weight
w of --weights (reward + w * mean log-probability: `--config.rlhf.reference_logp_weight=w` of
configs/rlhf_gpt.py with SFT as the reference), and the higher sentence chrF (what the judge
computes before its Bradley-Terry noise: the ceiling any scorer can reach on these verdicts).
Prints a Markdown table: accuracy in % with its standard error (sqrt(p (1 - p) / pairs)).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from train import cli
from train import preferences
from train import run_loader
from train.errors import UserError
from train.families import reward as reward_lib
from train.families import rlhf as rlhf_lib

_PAIRS = flags.DEFINE_string('pairs', None, 'The pairs directory (python -m train.preferences).')
_SFT = flags.DEFINE_string('sft', None, 'The SFT run the pairs were sampled from.')
_REWARD = flags.DEFINE_string('reward', None, 'A reward-family run, or several comma-separated '
                              '(their mean score).')
_WEIGHTS = flags.DEFINE_list('weights', ['0.5', '1', '2', '4'],
                             'Rows "reward + w x mean log-prob", one per w > 0.')
_SPLIT = flags.DEFINE_enum('split', 'validation', list(preferences.SPLITS),
                           'Which split\'s pairs to score.')
_BATCH = 64


@nnx.jit
def _score(sft, rewards, inputs, targets, weights):
  """Per row: the SFT model's mean token log-probability of the response and the reward
  models' mean score `[n]` each."""
  logp = rlhf_lib.token_log_probs(sft(inputs), targets)
  score = rlhf_lib.ensemble_score(rewards, inputs, reward_lib.last_response_index(weights))
  return rlhf_lib.response_mean(logp, weights), score


def score_pairs(sft, rewards, pairs: preferences.PairRows) -> tuple[np.ndarray, np.ndarray]:
  """(mean log-probability, reward score), each `[pairs, 2]` (column 0 the chosen response)."""
  logps, scores = [], []
  for k in range(0, len(pairs), _BATCH):
    picks = list(range(k, min(k + _BATCH, len(pairs))))
    rows = pairs.rows(picks + [picks[-1]] * (_BATCH - len(picks)))   # one compiled shape
    flat = {key: jnp.asarray(v.reshape((-1,) + v.shape[2:])) for key, v in rows.items()}
    logp, score = _score(sft, rewards, flat['inputs'], flat['targets'], flat['weights'])
    logps.append(np.asarray(logp).reshape(-1, 2)[:len(picks)])
    scores.append(np.asarray(score).reshape(-1, 2)[:len(picks)])
  return np.concatenate(logps), np.concatenate(scores)


def _weights() -> list[float]:
  out = []
  for value in _WEIGHTS.value:
    try:
      w = float(value)
    except ValueError:
      w = -1.0
    if not w > 0:
      raise UserError(f'--weights={",".join(_WEIGHTS.value)}: {value!r} is not a weight > 0')
    out.append(w)
  return out


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  weights = _weights()
  manifest, splits = preferences.load(_PAIRS.value, culprit='--pairs')
  family, models, step = run_loader.load_models(_SFT.value, name='--sft')
  sft = models['model']
  if manifest.get('tokenizer_sha256') != preferences.sha256(family.tokenizer.to_str()):
    raise UserError(f'--pairs={_PAIRS.value}: its pairs were tokenized by another tokenizer '
                    f'than --sft={_SFT.value}\'s')
  rewards = []
  for spec in rlhf_lib.reward_runs(_REWARD.value):
    reward_family, reward_models, _ = run_loader.load_run_of('reward', spec, '--reward')
    if reward_family.tokenizer.to_str() != family.tokenizer.to_str():
      raise UserError(f'--reward={spec}: its tokenizer differs from --sft={_SFT.value}\'s')
    rewards.append(reward_models['model'])
  rewards = tuple(rewards)
  pairs = preferences.PairRows(splits[_SPLIT.value], sft.context_size)
  if not len(pairs):
    raise UserError(f'--pairs={_PAIRS.value}: no usable {_SPLIT.value} pair')
  logp, score = score_pairs(sft, rewards, pairs)
  chrf = np.array([[r['chrf'][r['chosen']], r['chrf'][1 - r['chosen']]] for r in pairs.records])
  rows = [('reward model' + ('s (mean score)' if len(rewards) > 1 else ''), score),
          ('SFT mean token log-prob', logp)]
  rows += [(f'reward + {w:g} x SFT mean log-prob', score + w * logp) for w in weights]
  rows += [('higher sentence chrF (the judge before its noise)', chrf)]
  n = len(pairs)
  print(f'{n} {_SPLIT.value} pairs of {_PAIRS.value} (SFT {_SFT.value} step {step}; reward '
        f'{_REWARD.value}); agreement with the judge\'s verdicts:\n')
  print('| scorer | accuracy (%, +- s.e.) |\n|---|---|')
  for name, values in rows:
    p = float(np.mean(values[:, 0] > values[:, 1]))
    print(f'| {name} | {100 * p:.1f} +- {100 * math.sqrt(p * (1 - p) / n):.1f} |')


if __name__ == '__main__':
  flags.mark_flags_as_required(['pairs', 'sft', 'reward'])
  cli.run(main)
