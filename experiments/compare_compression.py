r"""Smaller and faster GPTs compared in one table: distillation, int8 quantization and pruning.

  TFDS_DATA_DIR=TFDS python -m experiments.compare_compression --out_dir=workdirs/compression \
      [--train_missing] [--teacher=RUN ...] [--rows=scratch,ptq_int8_weights,...]

Rows, each read from a run directory (default OUT/<row>, or the flag of the same name):
  teacher           gpt_shakespeare.py:teacher (6 x 256), --teacher_steps steps
  distilled         distill_gpt.py: the default 4 x 128 student distilled from that teacher,
                    --student_steps steps
  scratch           the same student trained from scratch for as many steps (gpt_shakespeare.py
                    with the student's shape): the f32 model every compression below starts from
  ptq_int8_weights, ptq_int8
                    `train.quantize` of `scratch` (post-training int8, weight-only and weights +
                    activations), written to OUT/<row> here whenever missing (no training;
                    delete the directory to redo it)
  qat               int8 quantization-aware training from `scratch` (--finetune_steps steps at lr
                    1e-4 to 1e-5), converted to int8 by `train.quantize` (OUT/qat_int8)
  scratch_tuned     `scratch` fine-tuned as the pruned runs are, unpruned: their control (a
                    short-trained `scratch` still gains from more steps, pruned or not)
  pruned_50, pruned_75, pruned_90, pruned_2_4
                    global magnitude pruning of `scratch` to 50/75/90% and 2:4, each fine-tuned
                    --finetune_steps steps from `init_from` with the mask fixed (lr 1e-3 to
                    1e-4, no warm-up)
A missing run is trained here (in this process, one after the other) only with --train_missing;
otherwise its command is printed and its row left out. Runs that finished are reused.

Columns (every model scored in this process, on the same data):
  val loss   mean cross-entropy per char on the validation batches training evaluates on (the
             scratch run's `eval_batches` x batch windows; the same batches for every row)
  bytes      what a user ships: the arrays of the model's params (no optimizer state). f32:
             4 bytes a param; int8 rows: int8 kernels + their f32 per-channel scales + the f32
             embeddings, norms and biases; pruned rows: stored dense (as their checkpoints
             are), with a sparse-format estimate beside it: the kept kernel weights in f32 plus
             a 1-bit mask per kernel weight (magnitude) or a 2-bit index per kept weight (2:4,
             the layout of NVIDIA's sparse tensor cores), the rest dense
  decode     new tokens/s of the KV-cache `generate` (--decode_batch rows x --decode_tokens
             tokens, median of 3 timed calls after a compiling one; all rows take turns in one
             loop, so a change of host load hits them alike), and its ratio to `scratch`'s
  sparsity   the share of exactly-zero weights among the prunable kernels (the attention and
             MLP kernels: `config.prune.params`)
Writes OUT/compression.md (table, goals, commands of missing runs), OUT/compression.png (val loss
against bytes and against decode tokens/s) and OUT/compression.json (every run's command).
`--tiny` runs the same on the configs' :tiny variants (a smoke test of seconds).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import flags
from flax import nnx

from experiments.configs import distill_gpt
from experiments.configs import gpt_shakespeare
from train import cli
from train import loop
from train import metrics as metrics_lib
from train import prune as prune_lib
from train import quantize as quantize_lib
from train import run_loader
from train import storage
from train.errors import UserError

TRAINED = ('teacher', 'distilled', 'scratch', 'scratch_tuned', 'qat', 'pruned_50', 'pruned_75',
           'pruned_90', 'pruned_2_4')
ROWS = ('teacher', 'distilled', 'scratch', 'ptq_int8_weights', 'ptq_int8', 'qat',
        'scratch_tuned', 'pruned_50', 'pruned_75', 'pruned_90', 'pruned_2_4')
REFERENCE = 'scratch'
PTQ = {'ptq_int8_weights': 'int8_weights', 'ptq_int8': 'int8'}
QAT_MODE = 'int8'
PRUNING = {'pruned_50': ('magnitude', 0.5), 'pruned_75': ('magnitude', 0.75),
           'pruned_90': ('magnitude', 0.9), 'pruned_2_4': ('2:4', 0.0)}

_OUT = flags.DEFINE_string('out_dir', 'workdirs/compression', 'Where runs and the table go.')
_RUN_DIRS = {name: flags.DEFINE_string(name, None, f'Run directory of row {name!r} '
                                       '(default: OUT/<row>).') for name in TRAINED}
_ROWS = flags.DEFINE_list('rows', list(ROWS), f'Rows to report, of: {", ".join(ROWS)}.')
_TRAIN = flags.DEFINE_bool('train_missing', False, 'Train the missing runs here (one by one).')
_TINY = flags.DEFINE_bool('tiny', False, 'Smoke test: the configs\' :tiny variants.')
_STUDENT_STEPS = flags.DEFINE_integer('student_steps', 1000, 'Steps of the distilled and the '
                                      'scratch student.')
_TEACHER_STEPS = flags.DEFINE_integer('teacher_steps', 2000, 'Steps of the teacher.')
_FINETUNE_STEPS = flags.DEFINE_integer('finetune_steps', 300, 'Steps of QAT and of each '
                                       'pruning fine-tune.')


# ------------------------------------------------------------------------------ the runs


class Run:
  """A run of a config file with overrides: its config, and the command that trains it."""

  def __init__(self, name: str, workdir: str, module, arg: str | None,
               overrides: dict[str, Any]):
    self.name, self.workdir, self.module, self.arg = name, workdir, module, arg
    self.overrides = overrides
    self.given = False  # named by its flag: read as it is, never trained here

  def config(self) -> ml_collections.ConfigDict:
    c = self.module.get_config(self.arg)
    c.update_from_flattened_dict(dict(self.overrides))
    return c

  def command(self) -> str:
    path = f'experiments/configs/{self.module.__name__.rsplit(".", 1)[-1]}.py'
    config = path + (f':{self.arg}' if self.arg else '')
    return ' '.join([f'python -m train --config={config} --workdir={self.workdir}'] +
                    [f'--config.{k}={v}' for k, v in self.overrides.items()])

  def finished(self) -> bool:
    if self.given:  # whatever its length; load_models names what is wrong with it
      if not storage.isdir(storage.join(self.workdir, 'checkpoints')):
        raise UserError(f'--{self.name}={self.workdir}: no checkpoints; is it a finished run?')
      return True
    steps = int(self.config().total_steps)
    return storage.isdir(storage.join(self.workdir, 'checkpoints', str(steps)))


def _schedule(steps: int, **extra) -> dict[str, Any]:
  return {'total_steps': steps, 'optimizer.decay_steps': steps, **extra}


def runs(out: str, dirs: dict[str, str | None], *, tiny: bool, student_steps: int,
         teacher_steps: int, finetune_steps: int) -> dict[str, Run]:
  """The trained rows' runs (module docstring); `dirs[name]` overrides OUT/<name>."""
  arg = 'tiny' if tiny else None
  workdir = {n: dirs.get(n) or os.path.join(out, n) for n in TRAINED}
  # The scratch student: the distillation config's student shape on the plain GPT config.
  student = distill_gpt.get_config(arg).model
  plain = gpt_shakespeare.get_config(arg).model
  shape = {f'model.{k}': v for k, v in student.items() if plain.get(k) != v}
  tune = lambda **extra: _schedule(finetune_steps, **{
      'init_from': workdir[REFERENCE], 'optimizer.warmup_steps': 0,
      'eval_every': finetune_steps, 'checkpoint_every': 0, **extra})
  out_runs = {
      'teacher': Run('teacher', workdir['teacher'], gpt_shakespeare, 'tiny' if tiny else 'teacher',
                     _schedule(teacher_steps)),
      'distilled': Run('distilled', workdir['distilled'], distill_gpt, arg, _schedule(
          student_steps, **{'distill.teacher': workdir['teacher']})),
      'scratch': Run('scratch', workdir['scratch'], gpt_shakespeare, arg,
                     _schedule(student_steps, **shape)),
      'qat': Run('qat', workdir['qat'], gpt_shakespeare, arg, {**shape, **tune(**{
          'quantize.mode': QAT_MODE, 'quantize.qat': True, 'optimizer.lr': 1e-4,
          'optimizer.min_lr': 1e-5})}),
  }
  # The pruning runs' control: the same fine-tune of `scratch`, unpruned.
  out_runs['scratch_tuned'] = Run('scratch_tuned', workdir['scratch_tuned'], gpt_shakespeare, arg,
                                  {**shape, **tune()})
  for name, (method, sparsity) in PRUNING.items():
    prune = {'prune.method': method, **({'prune.sparsity': sparsity} if sparsity else {})}
    out_runs[name] = Run(name, workdir[name], gpt_shakespeare, arg, {**shape, **tune(**prune)})
  for name, run in out_runs.items():
    run.given = bool(dirs.get(name))
  return out_runs


def needed_runs(rows: list[str]) -> list[str]:
  """The trained runs `rows` read, in training order (a source before what starts from it)."""
  need = set()
  for row in rows:
    need.add(REFERENCE if row in PTQ else row)
    if row == 'distilled':
      need.add('teacher')
    if row in ('qat', 'scratch_tuned') or row in PRUNING:
      need.add(REFERENCE)
  return [n for n in TRAINED if n in need]


def converted_dir(out: str, row: str) -> str:
  """The int8 run directory `train.quantize` writes for a PTQ row or the QAT run."""
  return os.path.join(out, 'qat_int8' if row == 'qat' else row)


# -------------------------------------------------------------------------- measurements


def sparse_bytes(params: Any, selected: list[bool], method: str) -> int:
  """Bytes of `params` with the selected kernels stored sparse (module docstring): 4 bytes per
  nonzero, plus a 1-bit mask per weight (magnitude) or a 2-bit index per kept weight (2:4);
  every other leaf dense."""
  total = 0
  for x, s in zip(jax.tree.leaves(params), selected):
    if not s:
      total += x.size * x.dtype.itemsize
      continue
    kept = int(jax.device_get((x != 0).sum()))
    index_bits = 2 * kept if method == '2:4' else x.size
    total += kept * x.dtype.itemsize + (index_bits + 7) // 8
  return total


def measure(out: str, rows: list[str], run_dirs: dict[str, str], configs: dict[str, Any], *,
            decode_batch: int, decode_tokens: int) -> dict[str, Any]:
  """Loads each row's model and measures the columns (module docstring)."""
  family, models, _ = run_loader.load_models(run_dirs[REFERENCE])
  family.setup_data(0, 1)
  batches = list(family.eval_batches())
  reference_bytes = quantize_lib.param_bytes({'model': models['model']})
  report_rows, loaded = [], {}
  for row in rows:
    workdir = converted_dir(out, row) if row in PTQ or row == 'qat' else run_dirs[row]
    row_family, row_models, step = run_loader.load_models(workdir)
    model = row_models['model']  # (a distillation run's student)
    config = row_family.config
    r = {'row': row, 'workdir': storage.absolute(workdir), 'step': step,
         'params': sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
         'bytes': quantize_lib.param_bytes({'model': model})}
    r['bytes_ratio'] = r['bytes'] / reference_bytes
    r['val_loss'] = quantize_lib.eval_loss(family, {'model': model}, batches)
    if row in PTQ or row == 'qat':
      r['quantize_mode'] = config.quantize.mode
    else:  # a float model: its zeros among the prunable kernels
      pruning = prune_lib.Pruning(configs.get(row) or config)
      params = {'model': nnx.state(model, nnx.Param)}
      r.update(pruning.sparsity_reached(params, ['model']))
      if pruning.enabled:
        r['sparse_bytes'] = sparse_bytes(params['model'],
                                         pruning.selected('model', params['model']),
                                         pruning.method)
        r['sparse_bytes_ratio'] = r['sparse_bytes'] / reference_bytes
    report_rows.append(r)
    loaded[row] = model
    metrics_lib.print_line(f'{row}: val loss {r["val_loss"]:.4f} | {r["bytes"]:,} bytes')
  if decode_tokens > 0:
    speed = quantize_lib.decode_tokens_per_s(loaded, batch=decode_batch, new_tokens=decode_tokens)
    for r in report_rows:
      r['decode_tokens_per_s'] = speed[r['row']]
      if REFERENCE in speed:
        r['decode_ratio'] = speed[r['row']] / speed[REFERENCE]
  reference_loss = next((r['val_loss'] for r in report_rows if r['row'] == REFERENCE), None)
  for r in report_rows:
    if reference_loss is not None:
      r['val_loss_change'] = r['val_loss'] - reference_loss
  return {'rows': report_rows, 'reference_bytes': reference_bytes, 'eval_batches': len(batches),
          'eval_windows': f'{len(batches)} x {family.config.batch_size} x '
                          f'{family.row_tokens()} chars',
          'decode_batch': decode_batch, 'decode_tokens': decode_tokens}


def goals(report: dict[str, Any]) -> list[str]:
  """The issue's three goals, each stated as met or not from the measured rows."""
  by = {r['row']: r for r in report['rows']}
  lines = []
  if 'ptq_int8_weights' in by and 'val_loss_change' in by['ptq_int8_weights']:
    r = by['ptq_int8_weights']
    ok = r['val_loss_change'] <= 0.02 and r['bytes_ratio'] <= 0.30
    lines.append(f'int8 weight-only PTQ within 0.02 of f32 at <= 30% of its bytes: '
                 f'{"met" if ok else "NOT met"} ({r["val_loss_change"]:+.4f} at '
                 f'{r["bytes_ratio"]:.1%})')
  if 'distilled' in by and REFERENCE in by:
    d, s = by['distilled']['val_loss'], by[REFERENCE]['val_loss']
    lines.append(f'distilled student beats the scratch student: {"met" if d < s else "NOT met"} '
                 f'({d:.4f} vs {s:.4f}, {d - s:+.4f})')
  if 'pruned_50' in by and 'scratch_tuned' in by:
    # Against the unpruned model fine-tuned alike: the fine-tune's own gain does not count.
    change = by['pruned_50']['val_loss'] - by['scratch_tuned']['val_loss']
    lines.append(f'50% magnitude pruning + fine-tuning within 0.03 of the unpruned model '
                 f'fine-tuned alike (scratch_tuned): {"met" if change <= 0.03 else "NOT met"} '
                 f'({change:+.4f})')
  return lines


# ------------------------------------------------------------------------------ the command


def compare(out: str, rows: list[str], *, dirs: dict[str, str | None] | None = None,
            tiny: bool = False, train_missing: bool = False, student_steps: int = 1000,
            teacher_steps: int = 2000, finetune_steps: int = 300, decode_batch: int = 8,
            decode_tokens: int = 256, devices=None) -> dict[str, Any]:
  """Trains (if asked) and converts what `rows` need, measures them, writes the table, the plot
  and the JSON under `out`; returns the report (its 'missing' lists untrained runs' commands)."""
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    raise UserError(f'--rows: unknown {", ".join(unknown)} (use {", ".join(ROWS)})')
  all_runs = runs(out, dirs or {}, tiny=tiny, student_steps=student_steps,
                  teacher_steps=teacher_steps, finetune_steps=finetune_steps)
  missing = {}
  for name in needed_runs(rows):
    run = all_runs[name]
    if run.finished():
      continue
    if not train_missing or any(n in missing for n in needed_runs([name]) if n != name):
      missing[name] = run.command()
      continue
    metrics_lib.print_line(f'training {name}: {run.command()}')
    loop.train(run.config(), run.workdir, devices=devices)
  rows = [r for r in rows if not set(needed_runs([r])) & set(missing)]
  # The int8 run directories (train.quantize; no training), made when missing.
  for row in rows:
    if row in PTQ or row == 'qat':
      target = converted_dir(out, row)
      if not storage.exists(storage.join(target, 'quantize.json')):
        source = all_runs['qat' if row == 'qat' else REFERENCE].workdir
        quantize_lib.quantize_run(source, target, PTQ.get(row, QAT_MODE), decode_tokens=0)
  report = {'rows': [], 'missing': missing}
  if rows:
    configs = {n: all_runs[n].config() for n in TRAINED if n in rows}
    report.update(measure(out, rows, {n: r.workdir for n, r in all_runs.items()}, configs,
                          decode_batch=decode_batch, decode_tokens=decode_tokens))
  report['missing'] = missing
  report['commands'] = {n: all_runs[n].command() for n in needed_runs(rows + list(missing))}
  report['goals'] = goals(report)
  storage.makedirs(out)
  storage.write_text(os.path.join(out, 'compression.json'), json.dumps(report, indent=1))
  storage.write_text(os.path.join(out, 'compression.md'), markdown(report))
  if report['rows']:
    plot(report, os.path.join(out, 'compression.png'))
  return report


def markdown(report: dict[str, Any]) -> str:
  head = ['model', 'val loss (vs scratch)', 'params', 'bytes (% of scratch)',
          'sparse-format bytes (%)', 'decode tokens/s (x scratch)', 'sparsity']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in report['rows']:
    change = f' ({r["val_loss_change"]:+.4f})' if 'val_loss_change' in r else ''
    cells = [r['row'] + (f' ({r["quantize_mode"]})' if 'quantize_mode' in r else ''),
             f'{r["val_loss"]:.4f}{change}', f'{r["params"]:,}',
             f'{r["bytes"]:,} ({r["bytes_ratio"]:.1%})',
             (f'{r["sparse_bytes"]:,} ({r["sparse_bytes_ratio"]:.1%})' if 'sparse_bytes' in r
              else '-'),
             (f'{r["decode_tokens_per_s"]:,.0f}' + (f' (x{r["decode_ratio"]:.2f})'
                                                    if 'decode_ratio' in r else '')
              if 'decode_tokens_per_s' in r else '-'),
             f'{r["sparsity"]:.1%}' if 'sparsity' in r else '-']
    lines.append('| ' + ' | '.join(cells) + ' |')
  text = '\n'.join(lines) + '\n'
  if report.get('goals'):
    text += '\n' + '\n'.join(f'- {g}' for g in report['goals']) + '\n'
  if report.get('missing'):
    text += '\nNot trained (run these, or pass --train_missing):\n\n```bash\n'
    text += '\n'.join(report['missing'].values()) + '\n```\n'
  return text


def plot(report: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = report['rows']
  speed = [r for r in rows if 'decode_tokens_per_s' in r]
  fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(13 if speed else 7, 4.5),
                           squeeze=False)
  ax = axes[0][0]
  for r in rows:
    size = r.get('sparse_bytes', r['bytes'])  # pruned: the sparse-format estimate
    ax.scatter(size / 2**20, r['val_loss'], marker='s' if 'sparse_bytes' in r else 'o')
    ax.annotate(r['row'], (size / 2**20, r['val_loss']), fontsize=8, xytext=(4, 2),
                textcoords='offset points')
  ax.set_xscale('log')
  ax.set_xlabel('bytes shipped, MiB (log; pruned, squares: sparse-format estimate)')
  ax.set_ylabel('val loss (nats per char)')
  ax.set_title('Quality against size')
  if speed:
    ax = axes[0][1]
    for r in speed:
      ax.scatter(r['decode_tokens_per_s'], r['val_loss'])
      ax.annotate(r['row'], (r['decode_tokens_per_s'], r['val_loss']), fontsize=8,
                  xytext=(4, 2), textcoords='offset points')
    ax.set_xscale('log')
    ax.set_xlabel(f'decode tokens/s (log; batch {report["decode_batch"]}, '
                  f'{report["decode_tokens"]} new tokens, this CPU)')
    ax.set_title('Quality against decode speed')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  out = _OUT.value
  report = compare(
      out, list(_ROWS.value), dirs={n: f.value for n, f in _RUN_DIRS.items()}, tiny=_TINY.value,
      train_missing=_TRAIN.value, student_steps=_STUDENT_STEPS.value,
      teacher_steps=_TEACHER_STEPS.value, finetune_steps=_FINETUNE_STEPS.value,
      decode_batch=flags.FLAGS.decode_batch, decode_tokens=flags.FLAGS.decode_tokens)
  print(markdown(report))
  print(f'wrote {out}/compression.md, ' + ('compression.png and ' if report['rows'] else '')
        + 'compression.json')


if __name__ == '__main__':
  cli.run(main)
