"""Launchers without JAX: launch/local.py's process handling, the TPU VM launcher's commands
(dry run and a fake gcloud that preempts), the SLURM script, and train/distributed.py's choice."""

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from launch import local
from launch import tpu_vm
from train import distributed
from train.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


# ------------------------------------------------------------------------------ launch/local.py


def test_local_prefixes_output_and_passes_process_flags(capfd, monkeypatch):
  # The caller's other XLA flags are kept; its device count is replaced.
  monkeypatch.setenv('XLA_FLAGS', '--xla_some_flag=1 --xla_force_host_platform_device_count=8')
  code = ('import os, sys; print(sys.argv[1:]); '
          'print(os.environ["XLA_FLAGS"], os.environ["JAX_PLATFORMS"])')
  assert local.launch([PY, '-c', code], num_processes=2, devices_per_process=3, timeout=60,
                      port=12345) == 0
  out = capfd.readouterr().out
  for i in (0, 1):
    assert (f"[p{i}] ['--coordinator_address=127.0.0.1:12345', '--num_processes=2', "
            f"'--process_id={i}']") in out
    assert f'[p{i}] --xla_some_flag=1 --xla_force_host_platform_device_count=3 cpu' in out


def test_local_stops_everyone_when_one_fails(capfd):
  # Process 1 fails at once; process 0 would sleep for a minute.
  code = 'import sys, time; sys.exit(3) if sys.argv[-1] == "--process_id=1" else time.sleep(60)'
  t0 = time.perf_counter()
  assert local.launch([PY, '-c', code], 2, 1, timeout=60) == 1
  assert time.perf_counter() - t0 < 15
  err = capfd.readouterr().err
  assert err.strip() == 'error: process 1 exited with status 3; stopped the other 1 process(es)'


def test_local_timeout_stops_everyone(capfd):
  t0 = time.perf_counter()
  assert local.launch([PY, '-c', 'import time; time.sleep(60)'], 2, 1, timeout=1) == 1
  assert time.perf_counter() - t0 < 15
  assert 'error: timeout: 1s passed with 2 process(es) still running' in capfd.readouterr().err


def test_local_command_line_needs_a_command():
  proc = subprocess.run([PY, 'launch/local.py', '--num_processes=2'], cwd=ROOT,
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2 and 'give the train command after --' in proc.stderr


# ----------------------------------------------------------------------------- launch/tpu_vm.py

TPU_ARGS = ['--name=genlab-v4', '--zone=us-central2-b', '--accelerator_type=v4-16',
            '--version=tpu-ubuntu2204-base', '--spot', '--max_retries=2', '--delete', '--',
            '--config=experiments/configs/gpt_shakespeare.py:gpu', '--workdir=gs://b/gpt',
            '--config.mesh.fsdp=-1']
TRAIN = ('.venv/bin/python -m train --config=experiments/configs/gpt_shakespeare.py:gpu '
         '--workdir=gs://b/gpt --config.mesh.fsdp=-1')


def test_tpu_dry_run_prints_the_commands():
  proc = subprocess.run([PY, 'launch/tpu_vm.py', '--dry_run', *TPU_ARGS], cwd=ROOT,
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if not l.startswith('#')]
  gcloud = [l for l in lines if l.startswith('gcloud')]
  assert gcloud[:2] == [
      "gcloud compute tpus tpu-vm describe genlab-v4 --zone=us-central2-b '--format=value(state)'",
      'gcloud compute tpus tpu-vm create genlab-v4 --zone=us-central2-b '
      '--accelerator-type=v4-16 --version=tpu-ubuntu2204-base --spot']
  # Copy, install and run go to every worker; the run is the same command each time.
  for verb in ('scp', 'ssh'):
    for l in (l for l in gcloud if f'tpu-vm {verb} ' in l):
      assert '--worker=all' in l, l
  runs = [l for l in gcloud if TRAIN in l]
  assert len(runs) == 2, proc.stdout  # the first run and the retry after a preemption
  assert runs[0] == runs[1] and "'--command=cd ~/genlab && " + TRAIN + "'" in runs[0]
  assert 'retry, up to --max_retries=2 times (the workdir resumes)' in proc.stdout
  retry = gcloud[gcloud.index(runs[0]) + 1:]
  assert [l.split()[4] for l in retry] == ['describe', 'delete', 'create', 'scp', 'ssh', 'ssh',
                                           'delete']
  assert gcloud[-1] == 'gcloud compute tpus tpu-vm delete genlab-v4 --zone=us-central2-b --quiet'


def test_tpu_retries_after_preemption_then_deletes():
  """A fake gcloud: no VM at first; the first run fails and the VM is PREEMPTED."""
  calls, states = [], iter(['', 'PREEMPTED'])

  def fake(cmd, capture):
    del capture
    verb = cmd[4] if cmd[0] == 'gcloud' else cmd[0]
    if verb == 'ssh' and TRAIN in cmd[-1]:
      verb = 'train'
    calls.append(verb)
    if verb == 'describe':
      state = next(states)
      return SimpleNamespace(returncode=0 if state else 1, stdout=state)
    failed = verb == 'train' and calls.count('train') == 1  # the first run is preempted
    return SimpleNamespace(returncode=255 if failed else 0, stdout='')

  assert tpu_vm.main(TPU_ARGS, runner=fake) == 0
  assert calls == [
      'describe', 'create', 'tar', 'scp', 'ssh', 'train',                      # first attempt
      'describe', 'delete', 'create', 'tar', 'scp', 'ssh', 'train', 'delete']  # retry, --delete


def test_tpu_needs_a_shared_workdir():
  proc = subprocess.run([PY, 'launch/tpu_vm.py', '--dry_run', '--name=a', '--zone=z', '--',
                         '--config=c.py', '--workdir=/tmp/run'], cwd=ROOT, capture_output=True,
                        text=True, timeout=60, check=False)
  assert proc.returncode == 2 and '--workdir=/tmp/run: use a gs:// path' in proc.stderr


# --------------------------------------------------------------- SLURM and train/distributed.py


def test_slurm_script_parses_and_runs_train_with_srun():
  assert subprocess.run(['bash', '-n', 'launch/slurm.sbatch'], cwd=ROOT, check=False
                        ).returncode == 0
  with open(os.path.join(ROOT, 'launch/slurm.sbatch'), encoding='utf-8') as f:
    script = f.read()
  assert 'srun --label --kill-on-bad-exit=1 "${PYTHON}" -m train' in script


@pytest.fixture
def initialize_calls(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))
  for var in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_NTASKS_PER_NODE',
              'SLURM_GPUS_ON_NODE', 'TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE'):
    monkeypatch.delenv(var, raising=False)
  return calls


def test_distributed_explicit_flags_bind_loopback(initialize_calls):
  assert distributed.initialize('127.0.0.1:4000', 2, 1) == 'flags'
  assert initialize_calls[0]['coordinator_bind_address'] == '127.0.0.1:4000'
  assert initialize_calls[0]['process_id'] == 1
  assert distributed.initialize('10.0.0.2:4000', 2, 0) == 'flags'
  assert initialize_calls[1]['coordinator_bind_address'] is None
  with pytest.raises(UserError, match='--process_id: needed with'):
    distributed.initialize('127.0.0.1:4000', 2, None)
  with pytest.raises(UserError, match='must be in'):
    distributed.initialize('127.0.0.1:4000', 2, 2)


def test_distributed_detects_slurm_and_tpu(initialize_calls, monkeypatch):
  assert distributed.initialize() == 'single' and not initialize_calls
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'node[1-2]')
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert distributed.initialize() == 'slurm'
  assert initialize_calls[-1]['local_device_ids'] is None  # JAX: one GPU per task
  monkeypatch.setenv('SLURM_NTASKS_PER_NODE', '1')
  monkeypatch.setenv('SLURM_GPUS_ON_NODE', '8')
  distributed.initialize()
  assert initialize_calls[-1]['local_device_ids'] == list(range(8))
  for var in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS'):
    monkeypatch.delenv(var)
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1')
  assert distributed.initialize() == 'tpu'


@pytest.mark.parametrize('accelerator, version', [
    ('v6e-8', 'v2-alpha-tpuv6e'), ('v5p-16', 'v2-alpha-tpuv5'),
    ('v5litepod-8', 'v2-alpha-tpuv5-lite'), ('v4-16', 'tpu-ubuntu2204-base'),
    ('v3-8', 'tpu-ubuntu2204-base')])
def test_tpu_software_version_follows_the_accelerator(accelerator, version):
  # The versions Cloud TPU documents per generation: https://cloud.google.com/tpu/docs/runtimes
  args = [a for a in TPU_ARGS if not a.startswith(('--version', '--accelerator_type'))]
  parsed, _ = tpu_vm.parse([f'--accelerator_type={accelerator}', *args])
  assert parsed.version == version
  parsed, _ = tpu_vm.parse([f'--accelerator_type={accelerator}', '--version=mine', *args])
  assert parsed.version == 'mine'


def test_tpu_unknown_accelerator_needs_a_version(capsys):
  args = [a for a in TPU_ARGS if not a.startswith(('--version', '--accelerator_type'))]
  with pytest.raises(SystemExit):
    tpu_vm.parse(['--accelerator_type=v9z-8', *args])
  assert '--accelerator_type=v9z-8: no known TPU software version' in capsys.readouterr().err
