"""End to end through the command line: train, checkpoint, resume, sample; bad input."""

import json
import os
import subprocess
import sys

import jax
import pytest
from absl import flags

from train import config as config_lib
from train import loop
from train import sample as sample_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'experiments/configs/gpt_shakespeare.py')

pytestmark = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')


def run(*args, devices=1, env=None):
  """Runs `python -m ARGS` with `devices` fake CPU devices; returns the CompletedProcess."""
  full_env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
              **(env or {})}
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=300, check=False)


def train(workdir, *overrides, **kwargs):
  return run('train', f'--config={CONFIG}:tiny', f'--workdir={workdir}', *overrides, **kwargs)


def metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def assert_one_line_error(proc, *fragments):
  assert proc.returncode != 0, proc.stdout + proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, proc.stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


def train_here(workdir, capsys, **overrides):
  """What `python -m train --config=CONFIG:tiny --workdir=WORKDIR --config.KEY=VALUE...` does
  on one device, run in this process (no imports, no compiles that an earlier test or process
  already did); returns (its TrainResult, what it printed)."""
  config = config_lib.apply_overrides(config_lib.load(f'{CONFIG}:tiny'),
                                      [(k, str(v)) for k, v in overrides.items()])
  capsys.readouterr()
  result = loop.train(config, workdir, devices=jax.devices()[:1])
  return result, capsys.readouterr().out


def sample_here(capsys, *args):
  """What `python -m train.sample ARGS` prints, run in this process."""
  capsys.readouterr()
  try:
    sample_lib.main(flags.FLAGS(['sample', *args]))
  finally:
    flags.FLAGS.unparse_flags()
  return capsys.readouterr().out


def test_train_checkpoint_resume_sample(tmp_path, capsys):
  # The commands themselves (`python -m train`, `python -m train.sample`) run once each here;
  # the rest of the test runs what they run in this process.
  resumed, straight = str(tmp_path / 'resumed'), str(tmp_path / 'straight')
  first = train(resumed, '--config.total_steps=10')
  assert first.returncode == 0, first.stderr
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == ['10']
  for name in ('config.json', 'family.json', 'metrics.jsonl'):
    assert os.path.isfile(os.path.join(resumed, name)), name
  assert any(f.startswith('events') for f in os.listdir(os.path.join(resumed, 'tensorboard')))
  assert os.listdir(os.path.join(resumed, 'samples')) == ['step_0000010.txt']
  with open(os.path.join(resumed, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['total_steps'] == 10

  # The same command with a later end resumes from step 10 and continues to 20.
  _, second = train_here(resumed, capsys, total_steps=20)
  assert 'Resumed from' in second and 'steps 10->20' in second
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == ['10', '20']

  # ... and logs exactly what an uninterrupted 20-step run logs.
  train_here(straight, capsys, total_steps=20)
  loss_rows = lambda w: {r['step']: r['loss'] for r in metrics(w) if 'loss' in r}
  eval_rows = lambda w: {r['step']: r['eval/loss'] for r in metrics(w) if 'eval/loss' in r}
  assert loss_rows(resumed) == loss_rows(straight)
  assert eval_rows(resumed) == eval_rows(straight)
  assert loss_rows(straight)[20] < loss_rows(straight)[5]

  # Sampling: the same seed gives the same text (the command, then in this process); temperature
  # 0 is greedy (seed-independent).
  sample = lambda *a: sample_here(capsys, f'--workdir={resumed}', '--max_new_tokens=40', *a)
  a = run('train.sample', f'--workdir={resumed}', '--max_new_tokens=40', '--seed=3',
          '--num_samples=2')
  assert a.returncode == 0, a.stderr
  assert 'step 20' in a.stdout
  b, c = sample('--seed=3', '--num_samples=2'), sample('--seed=4', '--num_samples=2')
  assert a.stdout == b and a.stdout != c
  g1 = sample('--seed=1', '--temperature=0', '--prompt=ROMEO:')
  g2 = sample('--seed=2', '--temperature=0', '--prompt=ROMEO:', '--top_k=5', '--top_p=0.9')
  assert g1 == g2
  assert 'ROMEO:' in g1
  sample('--max_new_tokens=100', '--top_k=10')  # longer than the block (32)


def test_sigterm_checkpoints_and_resumes(tmp_path, capsys):
  workdir = str(tmp_path)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'train', f'--config={CONFIG}:tiny', f'--workdir={workdir}',
       '--config.total_steps=100000', '--config.log_every=1', '--config.eval_every=0',
       '--config.checkpoint_every=0'],
      cwd=ROOT, env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith('step 3/'):
      proc.terminate()  # SIGTERM, as a preempting scheduler sends
      break
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert 'SIGTERM: checkpointing step' in out
  steps = [int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))]
  assert len(steps) == 1 and steps[0] >= 3
  _, resumed = train_here(workdir, capsys, total_steps=steps[0] + 2)
  assert f'steps {steps[0]}->{steps[0] + 2}' in resumed


@pytest.mark.parametrize('args, fragments', [
    (['--config.nope=1'], ['--config.nope', 'unknown config key']),
    (['--config.batch_size=abc'], ['--config.batch_size=abc', 'expected int']),
    (['--config.model.dropout=high'], ['--config.model.dropout=high', 'expected float']),
    (['--config.mesh.model=2'], ['--config.mesh.model', 'unknown config key']),
])
def test_bad_config_is_one_line(tmp_path, args, fragments):
  assert_one_line_error(train(str(tmp_path), *args), *fragments)


def test_bad_inputs_are_one_line(tmp_path):
  assert_one_line_error(train(str(tmp_path / 'a'), '--config.batch_size=6', devices=4),
                        'batch_size=6', 'not divisible by the 4 data-parallel devices')
  (tmp_path / 'file').write_text('')
  assert_one_line_error(train(str(tmp_path / 'file')), 'not a directory')
  assert_one_line_error(run('train', f'--config={CONFIG}:huge', f'--workdir={tmp_path}'),
                        "rejects argument 'huge'")
  # A dataset that is not prepared, offline and without raw files (a dead proxy makes any
  # download attempt fail at once), says how to prepare it.
  empty = tmp_path / 'empty_data_dir'
  empty.mkdir()
  dead_proxy = {'HTTPS_PROXY': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9',
                'https_proxy': 'http://127.0.0.1:9', 'http_proxy': 'http://127.0.0.1:9'}
  assert_one_line_error(train(str(tmp_path / 'b'), f'--config.data.data_dir={empty}',
                              env=dead_proxy), 'tiny_shakespeare', 'raw_dir')


def test_sample_bad_inputs_are_one_line(tmp_path, capsys):
  assert_one_line_error(run('train.sample', f'--workdir={tmp_path}'), 'no config.json')
  workdir = str(tmp_path / 'run')
  train_here(workdir, capsys, total_steps=2, checkpoint_every=0)
  assert_one_line_error(run('train.sample', f'--workdir={workdir}', '--top_p=1.5'),
                        '--top_p=1.5', '(0, 1]')
  assert_one_line_error(run('train.sample', f'--workdir={workdir}', '--top_p=0'), '--top_p=0')
  assert_one_line_error(run('train.sample', f'--workdir={workdir}', '--prompt=@@@'), "'@'")
  os.rename(os.path.join(workdir, 'checkpoints'), os.path.join(workdir, 'moved'))
  assert_one_line_error(run('train.sample', f'--workdir={workdir}'), 'no checkpoint')
