"""A bad restart loses nothing: another family or shape, non-finite weights, kill -9 mid-save."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import toy_families
from train import checkpoint as ckpt_lib
from train import loop
from train.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(workdir):
  """{relative path: bytes} of every file under `workdir`."""
  out = {}
  for path in glob.glob(os.path.join(workdir, '**'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def checkpoint_steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, 'checkpoints', '*'))
                if os.path.basename(p).isdigit())


def test_restart_with_another_shape_or_family_names_it_and_overwrites_nothing(tmp_path):
  workdir = str(tmp_path)
  loop.train(toy_families.regression_config(total_steps=2), workdir)
  before = snapshot(workdir)
  assert {'config.json', 'family.json'} <= set(before)

  with pytest.raises(UserError) as e:
    loop.train(toy_families.regression_config(total_steps=4, hidden=48), workdir)
  message = str(e.value)
  assert '\n' not in message and 'damaged' not in message
  assert 'config.hidden: 32 in the run, 48 now' in message
  assert 'params/model/l1/kernel: [1, 32] saved, [1, 48] now' in message
  assert snapshot(workdir) == before

  with pytest.raises(UserError, match="holds a 'toy_regression' run, but "
                                      "config.family='toy_gan'") as e:
    loop.train(toy_families.gan_config(total_steps=4), workdir)
  assert '\n' not in str(e.value)
  assert snapshot(workdir) == before

  # The right config still resumes.
  resumed = loop.train(toy_families.regression_config(total_steps=3), workdir)
  assert sorted(resumed.step_losses) == [3]


@pytest.mark.parametrize('where, optimizer', [('params', 'sgd'), ('opt', 'adam')])
def test_non_finite_state_with_a_finite_loss_is_never_checkpointed(tmp_path, where, optimizer):
  # The NaN enters the state in step 4's update; step 4's loss (computed before it) is finite,
  # and step 4 is a checkpoint step: a loss-only guard would save it as the last good state.
  config = toy_families.regression_config(
      total_steps=8, checkpoint_every=2, log_every=8, nan_state=where, nan_state_step=3,
      **{'optimizer.name': optimizer, 'optimizer.lr': 0.02})
  with pytest.raises(loop.NonFiniteLossError,
                     match='params or optimizer state became non-finite .* at step 4; '
                           r'.*last good checkpoint is step 2\)'):
    loop.train(config, str(tmp_path))
  assert checkpoint_steps(str(tmp_path)) == [2]
  restored, _ = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints')).restore(2, None)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_kill_9_during_an_async_checkpoint_write_keeps_the_previous_one(tmp_path):
  workdir = str(tmp_path)
  # 4M unused floats (16 MB, random so nothing compresses them): each save takes a while.
  args = [sys.executable, '-m', 'train', '--config=tests/toy_config.py', f'--workdir={workdir}',
          '--config.ballast=4000000', '--config.checkpoint_every=2', '--config.log_every=1']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  proc = subprocess.Popen(args + ['--config.total_steps=100000'], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  killed_during = None
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      entries = os.listdir(os.path.join(workdir, 'checkpoints')) if os.path.isdir(
          os.path.join(workdir, 'checkpoints')) else []
      finished = [e for e in entries if e.isdigit()]
      writing = [e for e in entries if not e.isdigit()]
      if finished and writing:
        proc.send_signal(signal.SIGKILL)  # mid-write: a temporary directory exists
        killed_during = writing[0]
        break
      time.sleep(0.005)
  finally:
    proc.kill()
    _, err = proc.communicate(timeout=60)
  assert killed_during is not None, err.decode()[-2000:]
  steps = checkpoint_steps(workdir)
  assert steps, os.listdir(os.path.join(workdir, 'checkpoints'))
  # The step being written when the process died never became a checkpoint.
  killed_step = int(killed_during.split('.')[0])
  assert killed_step not in steps and max(steps) < killed_step, (killed_during, steps)

  resumed = subprocess.run(args + [f'--config.total_steps={max(steps) + 1}'], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from {os.path.join(workdir, "checkpoints")}/{max(steps)}' in resumed.stdout
  assert f'steps {max(steps)}->{max(steps) + 1}' in resumed.stdout
