r"""Runs a train command on a Cloud TPU VM or pod slice, every worker at once, with gcloud.

  python launch/tpu_vm.py --name=genlab-v4 --zone=us-central2-b --accelerator_type=v4-16 \
      [--version=tpu-ubuntu2204-base] [--project=P] [--spot --max_retries=3] [--delete] [--dry_run] \
      -- --config=experiments/configs/gpt_shakespeare.py:gpu --workdir=gs://BUCKET/gpt

Steps: create the TPU VM (or reuse it when it exists and is READY); copy this checkout (a
tarball, without .git, virtual envs and workdirs) to every worker; install it with `jax[tpu]`
in a venv; run `python -m train ARGS` on all workers at once (`--worker=all`), streaming their
logs. On each worker `train/distributed.py` finds the Cloud TPU environment and calls
`jax.distributed.initialize()`, so the workers form one JAX runtime.

Preemption: when the run fails and the VM is PREEMPTED/TERMINATED (or gone), it is deleted,
re-created and the same command runs again, up to --max_retries times: the workdir is the
resume key, so it must outlive the VM (a gs:// path; Orbax writes checkpoints there directly).
`--delete` deletes the VM at the end (also after a failure). `--dry_run` prints the exact
commands, preemption retry included, without running anything.

--version (the TPU software version) defaults to the one Cloud TPU documents for the accelerator
generation (https://cloud.google.com/tpu/docs/runtimes): v6e -> v2-alpha-tpuv6e, v5p ->
v2-alpha-tpuv5, v5e (v5litepod-N) -> v2-alpha-tpuv5-lite, v4 and older -> tpu-ubuntu2204-base.

Only the standard library and the gcloud CLI.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = 'genlab'          # under the worker's home directory
PREEMPTED_STATES = ('PREEMPTED', 'TERMINATED', 'NOT_FOUND')
EXCLUDES = ('.git', '.venv', 'venv', 'workdirs', '__pycache__', '*.pyc', '.pytest_cache')

Runner = Callable[[Sequence[str], bool], subprocess.CompletedProcess]


def run_command(argv: Sequence[str], capture: bool) -> subprocess.CompletedProcess:
  """Runs argv, streaming its output unless `capture`."""
  return subprocess.run(list(argv), text=True, check=False,
                        capture_output=capture)


class TpuVm:
  """The gcloud commands for one TPU VM; `runner` executes them (a fake one in tests)."""

  def __init__(self, args: argparse.Namespace, train_args: Sequence[str], runner: Runner):
    self.args = args
    self.train_args = list(train_args)
    self.runner = runner
    self.tarball = f'/tmp/{args.name}-code.tgz'

  # ---- the commands ----
  def _where(self) -> list[str]:
    where = [f'--zone={self.args.zone}']
    if self.args.project:
      where.append(f'--project={self.args.project}')
    return where

  def describe_cmd(self) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', self.args.name, *self._where(),
            '--format=value(state)']

  def create_cmd(self) -> list[str]:
    cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', self.args.name, *self._where(),
           f'--accelerator-type={self.args.accelerator_type}', f'--version={self.args.version}']
    if self.args.spot:
      cmd.append('--spot')
    return cmd

  def pack_cmd(self) -> list[str]:
    excludes = [f'--exclude={e}' for e in EXCLUDES]
    return ['tar', '-czf', self.tarball, *excludes, '-C', self.args.code_dir, '.']

  def copy_cmd(self) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', self.tarball,
            f'{self.args.name}:{REMOTE_DIR}.tgz', *self._where(), '--worker=all']

  def ssh_cmd(self, command: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', self.args.name, *self._where(),
            '--worker=all', f'--command={command}']

  def install_cmd(self) -> list[str]:
    return self.ssh_cmd(
        f'rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && '
        f'tar -xzf ~/{REMOTE_DIR}.tgz -C ~/{REMOTE_DIR} && cd ~/{REMOTE_DIR} && '
        f'python3 -m venv .venv && .venv/bin/pip install -q -U pip && '
        f'.venv/bin/pip install -q -e . "{self.args.jax_package}"')

  def train_cmd(self) -> list[str]:
    train = ' '.join(shlex.quote(a) for a in ['.venv/bin/python', '-m', 'train',
                                                *self.train_args])
    return self.ssh_cmd(f'cd ~/{REMOTE_DIR} && {train}')

  def delete_cmd(self) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', self.args.name, *self._where(),
            '--quiet']

  # ---- running them ----
  def _run(self, cmd: Sequence[str], capture: bool = False) -> subprocess.CompletedProcess:
    print('+ ' + shlex.join(cmd), flush=True)
    return self.runner(cmd, capture)

  def state(self) -> str:
    proc = self._run(self.describe_cmd(), capture=True)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else 'NOT_FOUND'

  def _must(self, cmd: Sequence[str], what: str) -> None:
    if self._run(cmd).returncode != 0:
      raise RuntimeError(f'{what} failed: {shlex.join(cmd)}')

  def provision(self, state: str) -> None:
    """Creates the VM unless it is READY (deleting a preempted one first), copies, installs."""
    if state not in ('READY', *PREEMPTED_STATES):
      raise RuntimeError(f'TPU VM {self.args.name} is {state}: wait for READY or delete it')
    if state != 'READY':
      if state != 'NOT_FOUND':
        self._must(self.delete_cmd(), f'deleting the {state} TPU VM')
      self._must(self.create_cmd(), 'creating the TPU VM')
    self._must(self.pack_cmd(), 'packing the code')
    self._must(self.copy_cmd(), 'copying the code to every worker')
    self._must(self.install_cmd(), 'installing on every worker')

  def launch(self) -> int:
    """Provision, run, retry after preemption; returns the exit status."""
    attempts = 0
    status = 1
    try:
      self.provision(self.state())
      while True:
        if self._run(self.train_cmd()).returncode == 0:
          status = 0
          break
        state = self.state()
        if state not in PREEMPTED_STATES:
          print(f'error: the train command failed on {self.args.name} (state {state}): not a '
                f'preemption, so no retry', file=sys.stderr, flush=True)
          break
        if attempts >= self.args.max_retries:
          print(f'error: {self.args.name} was {state} and --max_retries={self.args.max_retries}'
                f' are used up', file=sys.stderr, flush=True)
          break
        attempts += 1
        print(f'[tpu_vm] {self.args.name} is {state}: retry {attempts}/'
              f'{self.args.max_retries}; the run resumes from its workdir', flush=True)
        self.provision(state)
    except RuntimeError as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
    finally:
      if self.args.delete:
        self._run(self.delete_cmd())
    return status

  def dry_run(self) -> None:
    """Prints the commands of a run whose VM does not exist yet, then those of a retry."""
    show = lambda cmd: print(shlex.join(cmd))
    print('# provision (skipped when describe says READY), copy, install, run on every worker')
    for cmd in (self.describe_cmd(), self.create_cmd(), self.pack_cmd(), self.copy_cmd(),
                self.install_cmd(), self.train_cmd()):
      show(cmd)
    print(f'# if the run fails and describe says one of {", ".join(PREEMPTED_STATES)}: retry, '
          f'up to --max_retries={self.args.max_retries} times (the workdir resumes)')
    if self.args.max_retries:
      for cmd in (self.describe_cmd(), self.delete_cmd(), self.create_cmd(), self.pack_cmd(),
                  self.copy_cmd(), self.install_cmd(), self.train_cmd()):
        show(cmd)
    if self.args.delete:
      print('# at the end (--delete)')
      show(self.delete_cmd())


# Accelerator type prefix -> TPU software version (https://cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = (('v6e-', 'v2-alpha-tpuv6e'), ('v5p-', 'v2-alpha-tpuv5'),
                    ('v5litepod-', 'v2-alpha-tpuv5-lite'), ('v5e-', 'v2-alpha-tpuv5-lite'),
                    ('v4-', 'tpu-ubuntu2204-base'), ('v3-', 'tpu-ubuntu2204-base'),
                    ('v2-', 'tpu-ubuntu2204-base'))


def default_version(accelerator_type: str) -> str | None:
  """The documented TPU software version for `accelerator_type`, or None when unknown."""
  for prefix, version in RUNTIME_VERSIONS:
    if accelerator_type.startswith(prefix):
      return version
  return None


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  argv = list(argv)
  split = argv.index('--') if '--' in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--name', required=True, help='TPU VM name')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project', default=None)
  parser.add_argument('--accelerator_type', default='v5litepod-8',
                      help='e.g. v4-8 (one host), v4-32 or v5litepod-16 (pod slices)')
  parser.add_argument('--version', default=None,
                      help='TPU software version (default: the one documented for '
                           '--accelerator_type, e.g. tpu-ubuntu2204-base for v4)')
  parser.add_argument('--spot', action='store_true', help='spot (preemptible) capacity')
  parser.add_argument('--max_retries', type=int, default=0,
                      help='re-create and rerun this many times after a preemption')
  parser.add_argument('--delete', action='store_true', help='delete the VM at the end')
  parser.add_argument('--dry_run', action='store_true', help='print the commands only')
  parser.add_argument('--code_dir', default=ROOT, help='checkout to copy')
  parser.add_argument('--jax_package', default='jax[tpu]', help='what pip installs for JAX')
  parser.add_argument('--allow_local_workdir', action='store_true',
                      help='accept a --workdir on the VM disk (lost when the VM goes)')
  args = parser.parse_args(argv[:split])
  train_args = argv[split + 1:]
  workdirs = [a.split('=', 1)[1] for a in train_args if a.startswith('--workdir=')]
  if not train_args or not any(a.startswith('--config=') for a in train_args) or not workdirs:
    parser.error('give the train flags after --, at least --config=... --workdir=...')
  if not workdirs[-1].startswith('gs://') and not args.allow_local_workdir:
    parser.error(f'--workdir={workdirs[-1]}: use a gs:// path shared by all workers and kept '
                 'across preemptions (or pass --allow_local_workdir)')
  if args.max_retries < 0:
    parser.error('--max_retries must be >= 0')
  if args.version is None:
    args.version = default_version(args.accelerator_type)
    if args.version is None:
      parser.error(f'--accelerator_type={args.accelerator_type}: no known TPU software version '
                   'for it; give --version (see https://cloud.google.com/tpu/docs/runtimes)')
  return args, train_args


def main(argv: Sequence[str] | None = None, runner: Runner = run_command) -> int:
  args, train_args = parse(sys.argv[1:] if argv is None else argv)
  vm = TpuVm(args, train_args, runner)
  if args.dry_run:
    vm.dry_run()
    return 0
  return vm.launch()


if __name__ == '__main__':
  sys.exit(main())
