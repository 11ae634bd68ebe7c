r"""The three transformer shapes side by side on Multi30k: one table, one command.

  encoder-only    (BERT, configs/bert_multi30k.py):       masked-token accuracy on val
  decoder-only    (GPT, configs/gpt_multi30k.py):         next-token perplexity on val
  encoder-decoder (translation, configs/translate_multi30k.py): test2016 BLEU (beam 4)

Per shape: parameters and train tokens/s of the default config's jitted train step (timed here,
one shape after the other in this process, median of --chunks runs of --steps steps; tokens are
what the family counts per step: BERT and GPT every slot of the batch, translation the real
source + target tokens of its packed rows), MFU (FLOPs from XLA's cost analysis, against one
f32 matmul peak, the best of 3 measurements, for every row), and the metric the
shape is trained for, read from a finished run of that config (--bert, --gpt, --translate:
run directories; a shape without one shows only its speed). The BLEU is the newest test2016
beam-4 report that `train.evaluate` wrote under the run.

  GENLAB_RAW_DATA=DIR python -m experiments.compare_transformers \
      --bert=RUN_BERT --gpt=RUN_GPT --translate=RUN_TRANSLATE      # DIR/multi30k/*.gz

Run it when the machine is quiet; report the host's `cpu family`.
"""

from __future__ import annotations

import json
import re

import jax
from absl import app, flags
from etils import epath

from experiments import train_speed
from experiments.configs import bert_multi30k, gpt_multi30k, translate_multi30k
from train import storage

_RUNS = {name: flags.DEFINE_string(name, None, f'A finished run of the default {name} config.')
         for name in ('bert', 'gpt', 'translate')}
_STEPS = flags.DEFINE_integer('steps', 5, 'Train steps per timed chunk.')
_CHUNKS = flags.DEFINE_integer('chunks', 3, 'Timed chunks (the median is reported).')


def last_eval(workdir: str) -> dict[str, float] | None:
  """The last eval row of the run's metrics.jsonl (every eval/ metric of that step)."""
  path = storage.join(workdir, 'metrics.jsonl')
  if not storage.isfile(path):
    raise FileNotFoundError(f'{path}: not found (is {workdir} a run directory?)')
  rows = [json.loads(l) for l in storage.read_text(path).splitlines() if l.strip()]
  rows = [r for r in rows if 'eval/loss' in r]
  return rows[-1] if rows else None


def bleu_report(workdir: str) -> dict | None:
  """The newest (highest checkpoint step) test2016 beam-4 BLEU report of a translate run."""
  paths = list(epath.Path(workdir, 'eval').glob('bleu_test2016_beam4_lp*_step*.json'))
  if not paths:
    return None
  step = lambda p: int(re.search(r'_step(\d+)\.json$', p.name).group(1))
  return json.loads(storage.read_text(max(paths, key=step)))


def metric(name: str, workdir: str | None) -> str:
  if workdir is None:
    return '(no run given)'
  if name in ('bert', 'gpt'):
    row = last_eval(workdir)
    if row is None:
      return '(no eval yet)'
    if name == 'bert':
      return (f'masked-token accuracy {100 * row["eval/mlm_accuracy"]:.1f}% at step '
              f'{row["step"]} (unigram baseline '
              f'{100 * row["eval/unigram_baseline_accuracy"]:.1f}%)')
    return f'val perplexity {row["eval/perplexity"]:.1f} per subword token at step {row["step"]}'
  report = bleu_report(workdir)
  return ('(no test2016 beam-4 report: run train.evaluate)' if report is None else
          f'test2016 BLEU {report["bleu"]:.2f}, chrF {report["chrf"]:.2f} (beam 4, step '
          f'{report["checkpoint_step"]})')


def main(argv):
  del argv
  print(f'devices: {jax.devices()}')
  shapes = (('encoder-only (BERT)', 'bert', bert_multi30k),
            ('decoder-only (GPT)', 'gpt', gpt_multi30k),
            ('encoder-decoder (translation)', 'translate', translate_multi30k))
  # One peak for every row (the best of 3), so the MFUs compare the shapes, not the moments.
  peak = train_speed.matmul_peak(jax.devices()[:1])
  print(f'f32 matmul peak {peak / 1e9:.0f} GFLOP/s (best of 3)')
  rows = []
  for label, name, module in shapes:
    r = train_speed.measure(module.get_config(), steps=_STEPS.value, chunks=_CHUNKS.value,
                            peak=peak)
    rows.append((label, f'{r["params"] / 1e6:.2f}M', f'{r["items_per_s"]:,.0f}',
                 f'{r["ms_per_step"]:.0f}', f'{100 * r["mfu"]:.1f}%',
                 metric(name, _RUNS[name].value)))
    print(f'{label}: {r["ms_per_step"]:.0f} ms/step, {r["gflops_per_step"]:.1f} GFLOP/step',
          flush=True)
  header = ('shape', 'params', 'train tokens/s', 'ms/step', 'MFU', 'its own metric')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for row in rows:
    print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
  app.run(main)
