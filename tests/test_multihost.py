"""Real multi-process JAX on this machine: `launch/local.py` runs 2 processes x 4 fake CPU
devices (jax.distributed over a loopback coordinator, gloo collectives) and must train exactly
as one process with 8 devices; a killed process stops the whole job, fast and loudly."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import gpt_shakespeare
from train import config as config_lib
from train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')
OVERRIDES = {'total_steps': '3', 'log_every': '1', 'eval_every': '0', 'checkpoint_every': '0',
             'sample_tokens': '8'}


def launcher(*args, timeout=600, **kwargs):
  return subprocess.Popen([sys.executable, 'launch/local.py', *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@needs_tfds
def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path):
  workdir = str(tmp_path / 'multi')
  t0 = time.perf_counter()
  proc = launcher('--num_processes=2', '--devices_per_process=4', '--timeout=300', '--',
                  sys.executable, '-m', 'train',
                  '--config=experiments/configs/gpt_shakespeare.py:tiny', f'--workdir={workdir}',
                  *[f'--config.{k}={v}' for k, v in OVERRIDES.items()])
  out, err = proc.communicate(timeout=330)
  wall = time.perf_counter() - t0
  assert proc.returncode == 0, out[-3000:] + err[-3000:]
  assert '[p0] mesh (data=8, fsdp=1, tensor=1) over 8 cpu device(s) in 2 process(es)' in out
  assert re.search(r'^\[p1\] step 3/3', out, re.M)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    multi = {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}
  # Only process 0 writes metrics and samples; every process wrote its part of the checkpoint.
  assert sorted(multi) == [1, 2, 3]
  assert os.listdir(os.path.join(workdir, 'samples')) == ['step_0000003.txt']
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']

  config = config_lib.apply_overrides(gpt_shakespeare.get_config('tiny'), OVERRIDES.items())
  single = loop.train(config, str(tmp_path / 'single'))  # this process: 8 devices
  assert jax.device_count() == 8
  np.testing.assert_allclose([multi[s] for s in (1, 2, 3)],
                             [single.step_losses[s] for s in (1, 2, 3)], rtol=1e-6)
  print(f'2 x 4 processes: {wall:.1f}s wall')


def test_a_killed_process_stops_the_job(tmp_path):
  proc = launcher('--num_processes=2', '--devices_per_process=4', '--timeout=240', '--',
                  sys.executable, '-m', 'train', '--config=tests/toy_config.py',
                  f'--workdir={tmp_path}', '--config.total_steps=1000000',
                  '--config.log_every=1', '--config.mesh.data=1', '--config.mesh.fsdp=-1')
  pids = {}
  try:
    for line in proc.stdout:
      started = re.match(r'\[launch\] process (\d) started \(pid (\d+)\)', line)
      if started:
        pids[int(started[1])] = int(started[2])
      if line.startswith('[p0] step 2/'):
        break
    killed_at = time.perf_counter()
    os.kill(pids[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  stopped_in = time.perf_counter() - killed_at
  assert proc.returncode == 1
  assert err.strip().splitlines()[-1] == (
      'error: process 1 was killed by SIGKILL; stopped the other 1 process(es)'), err
  assert stopped_in < 30, stopped_in
  with pytest.raises(ProcessLookupError):  # process 0 is gone too, not left waiting
    os.kill(pids[0], 0)
