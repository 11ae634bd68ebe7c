r"""Aligned models against their SFT model: DPO, and PPO with a small and a large KL penalty.

  GENLAB_RAW_DATA=DIR python -m experiments.compare_alignment --pairs=PAIRS --sft=SFT \
      --reward=REWARD --dpo=DPO --ppo_small=PPO_S --ppo_large=PPO_L --out_dir=OUT

Takes finished runs (it trains nothing; leave a flag out to skip that row, except --sft, --pairs
and --reward; --ppo=RUN1,RUN2,... adds a row "PPO" per run, e.g. a sweep over beta;
--sft_temperatures=0.8,0 adds rows of the SFT model sampled at those temperatures, 0 greedy:
what sharpening the SFT model alone wins, with no training). Train them
with, in order (the pairs from the SFT run first, see experiments/configs/reward_gpt.py):
  python -m train --config=experiments/configs/reward_gpt.py --workdir=REWARD \
      --config.init_from=SFT --config.preferences.path=PAIRS
  python -m train --config=experiments/configs/dpo_gpt.py --workdir=DPO \
      --config.init_from=SFT --config.dpo.reference=SFT --config.preferences.path=PAIRS
  python -m train --config=experiments/configs/rlhf_gpt.py --workdir=PPO_S \
      --config.init_from=SFT --config.rlhf.reference=SFT --config.rlhf.reward=REWARD \
      --config.preferences.path=PAIRS --config.rlhf.beta=0.01     (PPO_L: a larger beta)

Every model answers the pairs file's test prompts (held out from every run; --split=validation
for its validation prompts instead, which no run trains on either: choose settings there and
report the test prompts once) by sampling at
--temperature (default 1, as the pairs and the PPO rollouts were drawn; 0 is greedy), up to
--max_new_tokens tokens or [EOS], with one key per prompt shared by all models (common random
numbers). Columns: win rate against SFT under the hidden judge (the judge's probability of
preferring the model's response over SFT's on the same prompt, sigmoid of the chrF difference
over the pairs' judge temperature, averaged over prompts: a tie is 0.5; +- its standard error,
the per-prompt probabilities' standard deviation / sqrt(prompts)), chrF and BLEU against the
reference translations (sacreBLEU, corpus level), the reward model's mean score (with
--reward=RUN1,RUN2,... an ensemble's: the mean of its members' scores), the KL to
the reference (SFT) model (the exact KL of each response position's next-token distributions,
summed over the response, mean over prompts) and the mean response length. Writes
OUT/alignment.md (the table), OUT/alignment.json and OUT/alignment.png (reward-model score and
judge chrF against KL: reward hacking shows as the reward-model score rising while the judge's
score does not).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from models import gpt as gpt_lib
from train import cli
from train import metrics as metrics_lib
from train import preferences
from train import run_loader
from train import sample  # noqa: F401 (defines the sampling flags this command reads)
from train import storage
from train import text as text_lib
from train.errors import UserError
from train.families import reward as reward_lib
from train.families import rlhf as rlhf_lib

_PAIRS = flags.DEFINE_string('pairs', None, 'The pairs directory (python -m train.preferences).')
_SFT = flags.DEFINE_string('sft', None, 'The SFT run (gpt_instruct): the baseline and reference.')
_REWARD = flags.DEFINE_string('reward', None, 'A reward-family run (the reward-model score), '
                              'or several comma-separated (an ensemble: their mean score).')
_DPO = flags.DEFINE_string('dpo', None, 'A DPO run (optional).')
_PPO_SMALL = flags.DEFINE_string('ppo_small', None, 'An RLHF run with a small beta (optional).')
_PPO_LARGE = flags.DEFINE_string('ppo_large', None, 'An RLHF run with a large beta (optional).')
_PPO = flags.DEFINE_list('ppo', [], 'More RLHF runs, comma-separated (optional): rows "PPO", '
                         'e.g. a sweep over beta.')
_OUT = flags.DEFINE_string('out_dir', '/tmp/alignment', 'Where the table and plot go.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 60, 'Longer test prompts are left out.')
_SFT_TEMPERATURES = flags.DEFINE_list(
    'sft_temperatures', [], 'Rows "SFT at temperature T" (optional): the SFT model sampled at '
    'each of these temperatures (0: greedy), e.g. 0.8,0: what sharpening alone wins.')
_NUM_PROMPTS = flags.DEFINE_integer('num_prompts', None, 'Only the first N prompts '
                                    '(default: all).')
_SPLIT = flags.DEFINE_enum('split', 'test', ['test', 'validation'],
                           'Which of the pairs file\'s held-out prompts the models answer: test '
                           '(report) or validation (choose settings on it).')
_CHUNK = 50   # prompts per scoring call (bounds the [chunk, seq, vocab] logits in memory)


# train.sample's flags --temperature (default 1 here), --max_new_tokens (48) and --seed (0).
def _temperature() -> float:
  value = flags.FLAGS.temperature
  return 1.0 if value is None else float(value)


def _max_new_tokens() -> int:
  value = flags.FLAGS.max_new_tokens
  return 48 if value is None else int(value)


def _load(workdir: str, flag: str):
  if not storage.isdir(workdir):
    raise UserError(f'--{flag}={workdir}: no such run directory (train it first: see '
                    '`python -m experiments.compare_alignment --helpfull` or this module\'s '
                    'docstring)')
  return run_loader.load_models(workdir)


@nnx.jit(static_argnames=('max_new_tokens', 'temperature', 'eos_id'))
def _respond_and_score(model, reference, rewards, prompts, lengths, rows, key, *,
                       max_new_tokens: int, temperature: float, eos_id: int):
  """Samples responses and scores them: rows (inputs, targets, weights), the reward models'
  mean score `[n]` (`rewards`: a tuple of them) and the summed KL to the reference `[n]`."""
  keys = rlhf_lib.rollout_keys(key, rows)
  if temperature > 0:
    responses = gpt_lib.sample_continue(model, prompts, lengths, keys,
                                        max_new_tokens=max_new_tokens, temperature=temperature)
  else:
    responses = gpt_lib.greedy_continue(model, prompts, lengths, max_new_tokens=max_new_tokens)
  out = rlhf_lib.response_rows(prompts, lengths, responses, eos_id)
  w = out['weights']
  score = rlhf_lib.ensemble_score(rewards, out['inputs'], reward_lib.last_response_index(w))
  kl = jnp.sum(rlhf_lib.token_kl(model(out['inputs']), reference(out['inputs'])) * w, axis=1)
  return out, score, kl


def evaluate_model(model, reference, rewards, tokenizer, records, key,
                   temperature: float | None = None) -> dict:
  """Responses to `records`' prompts and their scores (per prompt: text, chrF, score, kl), sampled
  at `temperature` (default: --temperature)."""
  temperature = _temperature() if temperature is None else temperature
  width = _PROMPT_LEN.value
  texts, scores, kls, lengths_out = [], [], [], []
  for k in range(0, len(records), _CHUNK):
    chunk = records[k:k + _CHUNK]
    prompts = np.zeros((len(chunk), width), np.int32)
    for i, r in enumerate(chunk):
      prompts[i, :len(r['prompt_ids'])] = r['prompt_ids']
    lengths = np.array([len(r['prompt_ids']) for r in chunk], np.int32)
    rows = np.arange(k, k + len(chunk), dtype=np.int32)
    out, score, kl = _respond_and_score(
        model, reference, rewards, prompts, lengths, rows, key,
        max_new_tokens=_max_new_tokens(), temperature=temperature, eos_id=text_lib.EOS_ID)
    targets, weights = np.asarray(out['targets']), np.asarray(out['weights'])
    for row, w in zip(targets, weights):
      ids = [int(t) for t, keep in zip(row, w) if keep and t != text_lib.EOS_ID]
      texts.append(tokenizer.decode(ids).strip())
      lengths_out.append(float(w.sum()))
    scores += np.asarray(score).tolist()
    kls += np.asarray(kl).tolist()
  chrf = [preferences.chrf(t, r['reference']) for t, r in zip(texts, records)]
  return {'texts': texts, 'chrf': chrf, 'score': scores, 'kl': kls, 'tokens': lengths_out}


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  for name, value in (('pairs', _PAIRS.value), ('sft', _SFT.value), ('reward', _REWARD.value)):
    if not value:
      raise UserError(f'--{name} is required')
  temperatures = []
  for value in _SFT_TEMPERATURES.value:
    try:
      temperatures.append(float(value))
    except ValueError:
      temperatures.append(-1.0)
    if not temperatures[-1] >= 0:
      raise UserError(f'--sft_temperatures={",".join(_SFT_TEMPERATURES.value)}: {value!r} is '
                      'not a temperature >= 0')
  t0 = time.perf_counter()
  cpu0 = time.process_time()
  manifest, splits = preferences.load(_PAIRS.value, culprit='--pairs')
  split = _SPLIT.value
  records = [r for r in splits[split]
             if len(r['prompt_ids']) <= _PROMPT_LEN.value][:_NUM_PROMPTS.value]
  if not records:
    raise UserError(f'--pairs={_PAIRS.value}: no {split} prompt of at most --prompt_len='
                    f'{_PROMPT_LEN.value} tokens')
  sft_family, sft_models, sft_step = _load(_SFT.value, 'sft')
  sft_model = sft_models['model']
  tokenizer = sft_family.tokenizer
  if _PROMPT_LEN.value + _max_new_tokens() > sft_model.context_size:
    raise UserError(f'--prompt_len={_PROMPT_LEN.value} + --max_new_tokens={_max_new_tokens()}: '
                    f'more than the model\'s {sft_model.context_size} positions')
  if manifest.get('tokenizer_sha256') != preferences.sha256(tokenizer.to_str()):
    raise UserError(f'--pairs={_PAIRS.value}: its pairs were tokenized by another tokenizer '
                    f'than --sft={_SFT.value}\'s')
  loaded = [(spec, _load(spec, 'reward')) for spec in rlhf_lib.reward_runs(_REWARD.value)]
  rewards = tuple(models['model'] for _, (_, models, _) in loaded)
  reward_runs = ','.join(f'{spec}:{step}' for spec, (_, _, step) in loaded)
  # (label, run, flag, family, temperature): None samples at --temperature.
  runs = [('SFT', _SFT.value, 'sft', None, None)]
  runs += [(f'SFT at temperature {t:g}', _SFT.value, 'sft', None, t) for t in temperatures]
  runs += [('DPO', _DPO.value, 'dpo', 'dpo', None),
           ('PPO small beta', _PPO_SMALL.value, 'ppo_small', 'rlhf', None),
           ('PPO large beta', _PPO_LARGE.value, 'ppo_large', 'rlhf', None)]
  runs += [('PPO', run, 'ppo', 'rlhf', None) for run in _PPO.value]
  key = jax.random.key(flags.FLAGS.seed)
  judge_t = float(manifest.get('judge_temperature', 5.0))
  rows, baseline = [], None
  for label, workdir, flag, family_name, temperature in runs:
    if not workdir:
      continue
    if family_name is None:
      family, models, step = sft_family, sft_models, sft_step
    else:
      family, models, step = _load(workdir, flag)
      if family.name != family_name:
        raise UserError(f'--{flag}={workdir}: a {family.name!r} run, not {family_name!r}')
      if family.tokenizer.to_str() != tokenizer.to_str():
        raise UserError(f'--{flag}={workdir}: its tokenizer differs from --sft={_SFT.value}\'s')
    metrics_lib.print_line(f'{label}: {workdir} (step {step}) answering {len(records)} '
                           f'{split} prompts')
    result = evaluate_model(models['model'], sft_model, rewards, tokenizer, records, key,
                            temperature)
    if baseline is None:
      baseline = result
    wins = [preferences.preference_probability(a, b, judge_t)
            for a, b in zip(result['chrf'], baseline['chrf'])]
    import sacrebleu  # pylint: disable=import-outside-toplevel
    references = [r['reference'] for r in records]
    rows.append({
        'model': label, 'run': f'{storage.absolute(workdir)}:{step}',
        'beta': _beta(workdir, family_name),
        # An adaptive beta (config.rlhf.target_kl > 0): where it ended.
        'final_beta': (float(models['kl_control'].beta[...]) if 'kl_control' in models
                       else None),
        'temperature': _temperature() if temperature is None else temperature,
        'win_rate': 100.0 * float(np.mean(wins)),
        'win_rate_stderr': (100.0 * float(np.std(wins, ddof=1) / np.sqrt(len(wins)))
                            if len(wins) > 1 else 0.0),
        'chrf': sacrebleu.corpus_chrf(result['texts'], [references]).score,
        'bleu': sacrebleu.corpus_bleu(result['texts'], [references]).score,
        'mean_sentence_chrf': float(np.mean(result['chrf'])),
        'reward_score': float(np.mean(result['score'])), 'kl': float(np.mean(result['kl'])),
        'tokens': float(np.mean(result['tokens'])),
        'examples': [{'input': r['input'], 'reference': r['reference'], 'response': t}
                     for r, t in zip(records[:3], result['texts'][:3])]})
  report = {'pairs': storage.absolute(_PAIRS.value), 'reward': reward_runs,
            'split': split, 'prompts': len(records), 'temperature': _temperature(),
            'max_new_tokens': _max_new_tokens(), 'seed': flags.FLAGS.seed,
            'judge_temperature': judge_t, 'rows': rows,
            'wall_s': time.perf_counter() - t0, 'process_cpu_s': time.process_time() - cpu0}
  out = _OUT.value
  storage.makedirs(out)
  storage.write_text(os.path.join(out, 'alignment.json'), json.dumps(report, indent=1))
  table = markdown(report)
  storage.write_text(os.path.join(out, 'alignment.md'), table)
  plot(report, os.path.join(out, 'alignment.png'))
  print(table)
  print(f'wrote {out}/alignment.md, alignment.png and alignment.json '
        f'({report["wall_s"]:.0f} s wall, {report["process_cpu_s"]:.0f} s CPU)')


def _beta(workdir: str, family_name: str | None) -> float | None:
  if family_name is None:
    return None
  config = json.loads(storage.read_text(storage.join(workdir, 'config.json')))
  return float(config['dpo' if family_name == 'dpo' else 'rlhf']['beta'])


def _beta_cell(row) -> str:
  if row['beta'] is None:
    return '-'
  if row.get('final_beta') is None:
    return f'{row["beta"]:g}'
  return f'{row["beta"]:g} -> {row["final_beta"]:.3g} (adaptive)'


def markdown(report) -> str:
  head = ['model', 'beta', 'win rate vs SFT (judge, %, +- s.e.)', 'chrF', 'BLEU',
          'reward-model score', 'KL to SFT (nats)', 'response tokens']
  lines = [f'{report["prompts"]} {report["split"]} prompts of {report["pairs"]}, sampled at '
           f'temperature {report["temperature"]:g}', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in report['rows']:
    lines.append('| ' + ' | '.join([
        r['model'], _beta_cell(r),
        f'{r["win_rate"]:.1f} +- {r.get("win_rate_stderr", 0.0):.1f}',
        f'{r["chrf"]:.2f}', f'{r["bleu"]:.2f}', f'{r["reward_score"]:.3f}', f'{r["kl"]:.3f}',
        f'{r["tokens"]:.1f}']) + ' |')
  return '\n'.join(lines) + '\n'


def plot(report, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = report['rows']
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in ((axes[0], 'reward_score', 'reward-model score (mean)'),
                         (axes[1], 'mean_sentence_chrf', 'judge: sentence chrF (mean)')):
    for r in rows:
      ax.scatter(r['kl'], r[key], s=40)
      name = r['model'] if r['beta'] is None else f'{r["model"]} ({_beta_cell(r)})'
      ax.annotate(name, (r['kl'], r[key]), textcoords='offset points', xytext=(5, 4),
                  fontsize=8)
    ax.set_xlabel('KL to the SFT reference (nats per response)')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_title('What the policy was optimised for')
  axes[1].set_title('What the hidden judge scores')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  cli.run(main)
