r"""Adapting a pretrained GPT: full fine-tuning, LoRA and prompt tuning, single- and multi-task.

  GENLAB_RAW_DATA=DIR TFDS_DATA_DIR=TFDS python -m experiments.compare_adaptation \
      --out_dir=/tmp/adaptation

Pretrains experiments/configs/gpt_base.py in OUT/base (unless --base names a finished run of
it, of any ARG), then fine-tunes it with each method of experiments/configs/gpt_instruct.py
(full, lora4, lora16, prompt20) on one task (en_de) and on the five-task mix (--mixes also
takes a task's name: that task alone), and scores every model, the base zero-shot included,
on each task's test examples (sacreBLEU on Multi30k test2016; exact match on held-out
synthetic examples) and on the LM loss over Tiny Shakespeare's validation split (forgetting:
the base's value before, each tuned model's after). Runs that finished are reused (delete a
run directory to redo it). With --space_starts_response every prompt leaves its trailing space
to the response, whose first word is then tokenized as in running text (train/instruct.py).
Writes OUT/adaptation.md (the table), OUT/adaptation.png (scores and forgetting per method)
and OUT/adaptation.json.

Columns: trained params (and % of the base's), optimizer-state bytes (Adam moments of the
trained params), checkpoint bytes (the final checkpoint on disk), step time (the jitted train
step alone, median of 3 x 5 steps, measured back to back at the end), the scores and the
forgetting loss.
"""

from __future__ import annotations

import json
import os

from absl import flags

from experiments import train_speed
from experiments.configs import gpt_base
from experiments.configs import gpt_instruct
from train import checkpoint as ckpt_lib
from train import cli
from train import families
from train import instruct
from train import loop
from train import metrics as metrics_lib
from train import run_loader
from train import storage
from train import tune
from train.errors import UserError

METHODS = ('full', 'lora4', 'lora16', 'prompt20')
MIXES = {'single': ('en_de',), 'multi': ('en_de', 'de_en', 'reverse', 'sort', 'count')}

_OUT = flags.DEFINE_string('out_dir', '/tmp/adaptation', 'Where runs and the table go.')
_BASE = flags.DEFINE_string('base', None, 'A finished gpt_base.py run, any ARG (default: '
                            'OUT/base, trained if missing).')
_METHODS = flags.DEFINE_list('methods', list(METHODS), 'gpt_instruct.py methods to run.')
_MIXES = flags.DEFINE_list('mixes', list(MIXES), 'Task mixes: single (en_de), multi (all), or '
                           'a task\'s name (that task alone).')
_STEPS = flags.DEFINE_integer('tune_steps', None, 'Fine-tuning steps (default: the config\'s).')
_TINY = flags.DEFINE_bool('tiny', False, 'Smoke test: the configs\' tiny variants.')
_SPACE = flags.DEFINE_bool(
    'space_starts_response', False, 'Every model, the base included, gets and learns the '
    'prompt without its trailing space, which starts the response instead '
    '(config.data.space_starts_response; train/instruct.py says why).')


def mix_tasks(mix: str) -> tuple[str, ...]:
  """The tasks of --mixes entry `mix`: MIXES's, or the task of that name alone."""
  if mix in MIXES:
    return MIXES[mix]
  if mix in instruct.INSTRUCTIONS:
    return (mix,)
  raise UserError(f'--mixes: unknown mix {mix!r}; known: {", ".join(MIXES)} or a task '
                  f'({", ".join(instruct.INSTRUCTIONS)})')


def _finished(workdir: str, steps: int) -> bool:
  path = storage.join(workdir, 'checkpoints', str(steps))
  return storage.isdir(path)


def base_config():
  return gpt_base.get_config('tiny' if _TINY.value else None)


def instruct_config(method: str, tasks: tuple[str, ...], base: str, base_model: dict, *,
                    tiny: bool = False, steps: int | None = None,
                    space_starts_response: bool = False):
  """gpt_instruct.py's config of `method` on `tasks`, fine-tuning the finished run `base`.

  base_model: the base run's model section (its config.json), which the config takes, so a
  base of another shape than gpt_base.py's default (e.g. ARG parallel_wide) fine-tunes as it
  is: its params restore by path and must match in shape. steps: fine-tuning steps instead of
  the config's. space_starts_response: config.data's.
  """
  c = gpt_instruct.get_config(method + (',tiny' if tiny else ''))
  c.data.tasks = tasks
  c.data.space_starts_response = space_starts_response
  c.init_from = base
  c.model.update({k: v for k, v in base_model.items() if k in c.model and c.model[k] != v})
  if steps:
    c.total_steps = c.optimizer.decay_steps = steps
  return c


def _train(config, workdir: str) -> None:
  if _finished(workdir, int(config.total_steps)):
    done = storage.read_json(storage.join(workdir, 'config.json'), workdir)['data']
    space = bool(config.data.space_starts_response)
    if done.get('space_starts_response', False) != space:
      raise UserError(f'{workdir}: a finished run trained with space_starts_response='
                      f'{not space}; use another --out_dir for --space_starts_response={space}')
    metrics_lib.print_line(f'{workdir}: finished run, reused')
    return
  loop.train(config, workdir)


def _scores(config, model) -> dict:
  """Task scores and forgetting loss of `model` as `config`'s instruction family sees it."""
  family = families.get(config.family)(config)
  # The base run's tokenizer (every run here shares it); task_scores reads the test examples.
  family.read_run_files(tune.parse_init_from(config.init_from)[0])
  return {'tasks': {t: s['score'] for t, s in family.task_scores(model).items()},
          'forgetting_loss': family.forgetting_loss(model)}


def main(argv):
  del argv
  out = _OUT.value
  mixes = {mix: mix_tasks(mix) for mix in _MIXES.value}   # every name checked before training
  base = _BASE.value or os.path.join(out, 'base')
  bc = base_config()
  if not _BASE.value:
    _train(bc, base)
  all_tasks = MIXES['multi']
  base_model = storage.read_json(storage.join(base, 'config.json'), f'--base={base}')['model']
  tuning = dict(base_model=base_model, tiny=_TINY.value, steps=_STEPS.value,
                space_starts_response=_SPACE.value)
  rows = []
  # The base, zero-shot: its own weights scored on every task.
  probe = instruct_config('full', all_tasks, base, **tuning)
  _, base_models, base_step = run_loader.load_models(base)
  zero = _scores(probe, base_models['model'])
  setup = loop.setup(probe)
  base_params = loop.num_params(setup.builder.abstract['params'])
  rows.append({'method': 'base (zero-shot)', 'mix': '-', 'trained': 0,
               'opt_bytes': 0, 'ckpt_bytes': ckpt_lib.step_bytes(
                   storage.join(base, 'checkpoints'), base_step), **zero})
  runs = []
  for mix, tasks in mixes.items():
    for method in _METHODS.value:
      config = instruct_config(method, tasks, base, **tuning)
      workdir = os.path.join(out, f'{mix}_{method}')
      _train(config, workdir)
      _, models, step = run_loader.load_models(workdir)
      scored = instruct_config(method, all_tasks, base, **tuning)
      scored.model.prompt_tokens = config.model.prompt_tokens
      s = loop.setup(config)
      rows.append({'method': method, 'mix': mix,
                   'trained': s.builder.trainable.count(s.builder.abstract['params']),
                   'opt_bytes': ckpt_lib.array_bytes(s.builder.abstract['opt']),
                   'ckpt_bytes': ckpt_lib.step_bytes(storage.join(workdir, 'checkpoints'), step),
                   **_scores(scored, models['model'])})
      runs.append((rows[-1], config))
  # Step times last, back to back, so that they share the machine's state.
  for row, config in runs:
    row['step_ms'] = train_speed.measure(config, steps=5, chunks=3)['ms_per_step']
  for row in rows:
    row['trained_pct'] = 100.0 * row['trained'] / base_params
  report = {'base': base, 'base_params': base_params, 'space_starts_response': _SPACE.value,
            'rows': rows}
  storage.write_text(os.path.join(out, 'adaptation.json'), json.dumps(report, indent=1))
  table = markdown(report)
  storage.write_text(os.path.join(out, 'adaptation.md'), table)
  plot(report, os.path.join(out, 'adaptation.png'))
  print(table)
  print(f'wrote {out}/adaptation.md, adaptation.png and adaptation.json')


def method_label(method: str) -> str:
  """How the tables name a gpt_instruct.py method: 'LoRA r=4' for ARG lora4 (plain adapters on
  the default targets), 'DoRA r=8', 'prompt (20 vectors)'; any other (e.g. lora4mt) by name."""
  spec = gpt_instruct.METHODS.get(method, {})
  if spec.get('trainable') == 'prompt':
    return f'prompt ({spec["prompt_tokens"]} vectors)'
  if spec.get('trainable') == 'lora' and 'targets' not in spec and 'embed_rank' not in spec:
    return f'{"DoRA" if spec.get("dora") else "LoRA"} r={spec["rank"]}'
  return method


def mix_label(mix: str) -> str:
  """How the tables name a --mixes entry: its task(s) ('en_de' for single), 'all five' for
  the mix of MIXES['multi']."""
  if mix == 'multi':
    return f'all {_WORDS.get(len(MIXES["multi"]), len(MIXES["multi"]))}'
  return ', '.join(MIXES.get(mix, (mix,)))


_WORDS = {2: 'two', 3: 'three', 4: 'four', 5: 'five', 6: 'six'}


def markdown(report) -> str:
  """The table (trained share of the base: '0', '100%' or two decimals; sizes in MiB)."""
  tasks = list(MIXES['multi'])
  head = (['method', 'tasks', 'trained params (% of base)', 'optimizer state', 'checkpoint',
           'step ms'] + [f'{t} {"BLEU" if t.endswith(("_de", "_en")) else "EM %"}'
                         for t in tasks] + ['Shakespeare LM loss (change)'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  base_loss = report['rows'][0]['forgetting_loss']
  mb = lambda b: f'{b / 2**20:.2f} MiB' if b else '0'
  for r in report['rows']:
    loss = r['forgetting_loss']
    share = ('' if not r['trained'] else ' (100%)' if r['trained'] == report['base_params']
             else f' ({r["trained_pct"]:.2f}%)')
    cells = ([r['method'], '-'] if r['mix'] == '-' else [method_label(r['method']),
                                                         mix_label(r['mix'])])
    cells += [f'{r["trained"]:,}{share}', mb(r['opt_bytes']), mb(r['ckpt_bytes']),
             f'{r["step_ms"]:.0f}' if 'step_ms' in r else '-']
    cells += [f'{r["tasks"][t]:.1f}' for t in tasks]
    cells.append(f'{loss:.3f}' + ('' if r is report['rows'][0] else f' ({loss - base_loss:+.3f})'))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot(report, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = report['rows']
  tasks = list(MIXES['multi'])
  labels = [r['method'] if r['mix'] == '-'
            else f'{method_label(r["method"])}\n{mix_label(r["mix"])}' for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={'width_ratios': [3, 1]})
  width = 0.8 / len(tasks)
  for i, task in enumerate(tasks):
    axes[0].bar([k + i * width for k in range(len(rows))], [r['tasks'][task] for r in rows],
                width, label=task)
  axes[0].set_xticks([k + 0.4 - width / 2 for k in range(len(rows))], labels, fontsize=8)
  axes[0].set_ylabel('BLEU (translation) / exact match % (synthetic)')
  axes[0].legend(fontsize=8)
  axes[0].set_title('Task scores on held-out test examples')
  before = rows[0]['forgetting_loss']
  axes[1].barh(labels[1:][::-1], [r['forgetting_loss'] - before for r in rows[1:]][::-1])
  axes[1].axvline(0.0, color='k', lw=0.8)
  axes[1].set_xlabel('Shakespeare val LM loss, after - before')
  axes[1].set_title('Forgetting (0: none)')
  axes[1].tick_params(axis='y', labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  cli.run(main)
